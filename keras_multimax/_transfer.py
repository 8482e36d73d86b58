"""The state a MultiMax copy takes from its SoftMax original, for both strategies.

`keras_multimax.convert.to_multimax` builds a new model (a Functional or
Sequential graph with MultiMax twins of its attention layers, or a MultiMax
KerasHub model from the original's config) and then gives it the original's
state with `transfer_state`: the same quantization, the same LoRA adapters,
every weight value and every ``trainable`` flag. The only variables the copy
may have on top are the ``ranges``/``ts`` of its modulators.
"""

from __future__ import annotations

import keras

__all__ = ["modulator_variables", "transfer_state"]

# The errors Keras raises when a layer cannot be quantized in a mode.
_QUANTIZE_ERRORS = (NotImplementedError, TypeError, ValueError)

_CONVERT_FIRST = (
    "Convert before quantizing: call `to_multimax` on the float model, then "
    "quantize the result (`new_model.quantize(...)`)."
)


def modulator_variables(model) -> list:
    """The ``ranges``/``ts`` variables of every MultiMax layer of `model`."""
    found = []
    for layer in model._flatten_layers(include_self=True):
        ranges = getattr(layer, "ranges", None)
        ts = getattr(layer, "ts", None)
        if isinstance(ranges, keras.Variable) and isinstance(ts, keras.Variable):
            found += [ranges, ts]
    return found


def transfer_state(old, new, created=()) -> None:
    """Gives `new` the quantization, LoRA adapters, weights and flags of `old`.

    `old` and `new` are two layers or models of the same architecture (`new`
    with MultiMax twins of the attention layers): sublayers are matched by
    their path below the root. In order:

    1. a sublayer of `new` is quantized as its match in `old` is (the twins'
       projections are built in float);
    2. LoRA is enabled on a sublayer of `new` whose match in `old` has it,
       with the same rank and alpha;
    3. every variable of `old` is copied into its match in `new`, with its
       ``trainable`` flag. Variables are matched by path when both sides
       have the same unique paths (besides `created`, the variables the
       conversion added), otherwise in creation order, as `set_weights`
       does (some KerasHub layers have auto-numbered names, which differ
       between two instances); shapes and dtypes are checked either way.

    Raises a ``ValueError`` naming the layer or weight that cannot be carried.
    """
    new_layers = _sublayers(new)
    for path, layer in _sublayers(old).items():
        quantized = getattr(layer, "quantization_mode", None)
        lora = getattr(layer, "lora_enabled", False)
        if not quantized and not lora:
            continue
        twin = new_layers.get(path)
        if twin is None:
            raise ValueError(
                f"`to_multimax` cannot find the layer {layer.path!r} of "
                f"{old.name!r} in its MultiMax copy, so its "
                f"{'quantization' if quantized else 'LoRA adapters'} cannot "
                "be carried over. Convert the float model without LoRA, then "
                "quantize or call `enable_lora` on the result."
            )
        if quantized and twin.quantization_mode != quantized:
            _quantize_like(layer, twin)
        if lora and not twin.lora_enabled:
            twin.enable_lora(layer.lora_rank, lora_alpha=layer.lora_alpha)
    for variable, target in _variable_pairs(old, new, created):
        if (
            tuple(variable.shape) != tuple(target.shape)
            or variable.dtype != target.dtype
        ):
            raise ValueError(
                f"`to_multimax` cannot copy the weight {variable.path!r} of "
                f"{old.name!r}: it is {variable.dtype}{tuple(variable.shape)} "
                f"in the original and {target.dtype}{tuple(target.shape)} in "
                f"the MultiMax copy ({target.path!r})."
                + (f" {_CONVERT_FIRST}" if _is_quantized(old) else "")
            )
        # A copy of the value: JAX arrays are shared by an assignment, and a
        # jitted train step of either model donates (deletes) its arrays.
        target.assign(keras.ops.copy(variable.value))
        target.trainable = variable.trainable


def _relative(path: str, root: str) -> str:
    prefix = f"{root}/"
    return path[len(prefix) :] if root and path.startswith(prefix) else path


def _sublayers(root) -> dict:
    """Layers below `root` (and `root`, as ""), by their path below it."""
    found = {}
    for layer in root._flatten_layers(include_self=True):
        key = "" if layer is root else _relative(layer.path or "", root.path or "")
        found.setdefault(key, layer)
    return found


def _is_quantized(model) -> bool:
    return any(
        getattr(layer, "quantization_mode", None)
        for layer in model._flatten_layers(include_self=True)
    )


def _quantize_like(old, new):
    mode = old.quantization_mode
    try:
        new.quantize(mode, config=old.quantization_config)
    except _QUANTIZE_ERRORS as error:
        raise ValueError(
            f"`to_multimax` cannot rebuild the {mode!r}-quantized layer "
            f"{old.path!r} in the MultiMax copy: {error}. {_CONVERT_FIRST}"
        ) from error


def _variable_pairs(old, new, created) -> list:
    skip = {id(v) for v in created}
    sources = list(old.weights)
    targets = [v for v in new.weights if id(v) not in skip]
    old_paths = [_relative(v.path, old.path or "") for v in sources]
    new_paths = [_relative(v.path, new.path or "") for v in targets]
    if len(set(old_paths)) == len(old_paths) and sorted(old_paths) == sorted(new_paths):
        by_path = dict(zip(new_paths, targets))
        return [(v, by_path[p]) for v, p in zip(sources, old_paths)]
    if len(sources) != len(targets):
        raise ValueError(
            f"`to_multimax` cannot match the weights of {old.name!r} with its "
            f"MultiMax copy: {len(sources)} weights in the original, "
            f"{len(targets)} (besides the new ranges/ts) in the copy. Only in "
            f"the original: {sorted(set(old_paths) - set(new_paths))}; only "
            f"in the copy: {sorted(set(new_paths) - set(old_paths))}."
            + (f" {_CONVERT_FIRST}" if _is_quantized(old) else "")
        )
    return list(zip(sources, targets))
