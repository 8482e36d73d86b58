"""Swapping MultiMax into existing Keras models: `to_multimax`, one engine.

`to_multimax` is the one entry point. It picks a strategy by the kind of
model and hands both the same last step:

- **Keras** (this module): a Functional or Sequential model is rebuilt
  layer by layer (`keras.models.clone_model`), each attention layer as its
  MultiMax twin (`keras_multimax.layers.MultiMaxAttention`...) and the SoftMax
  output layers too with ``replace_softmax=True``;
- **KerasHub** (`keras_multimax.hub`, imported only for a KerasHub model): a
  Backbone or Task is rebuilt from its config as its registered MultiMax
  class, whose attention layers are MultiMax twins;
- both then copy the original's state into the copy with
  `keras_multimax._transfer.transfer_state`: quantization, LoRA adapters,
  weights and trainable flags.

`keras_multimax.hub` does not import this module, so there is no import
cycle.
"""

from __future__ import annotations

import sys
from typing import Any

import keras

from keras_multimax._transfer import modulator_variables
from keras_multimax._transfer import transfer_state
from keras_multimax.layers.multimax import MultiMax
from keras_multimax.layers.multimax_attention import MultiMaxAttention
from keras_multimax.layers.multimax_attention import validate_per_head
from keras_multimax.layers.multimax_group_query_attention import (
    MultiMaxGroupQueryAttention,
)
from keras_multimax.modulator import Modulator
from keras_multimax.modulator import pop_legacy_arguments

__all__ = ["ActivationMultiMax", "to_multimax"]

# Softmax attention class -> its MultiMax twin. Only these exact classes are
# converted: a subclass may change the computation in ways a twin would drop.
_ATTENTION_TWINS = {
    keras.layers.MultiHeadAttention: MultiMaxAttention,
    keras.layers.GroupQueryAttention: MultiMaxGroupQueryAttention,
}
_MULTIMAX_ATTENTION = (MultiMaxAttention, MultiMaxGroupQueryAttention)


@keras.saving.register_keras_serializable(package="keras_multimax")
class ActivationMultiMax(MultiMax):
    """MultiMax over the last axis used as an *activation*: ignores Keras masks.

    `to_multimax(..., replace_softmax=True)` puts this layer where a
    ``Dense(..., activation="softmax")`` or an ``Activation("softmax")`` was.
    Like those (and unlike `keras.layers.Softmax`), it does not apply the Keras
    mask of its input to the normalised axis; it passes the mask on unchanged.
    Everything else is `keras_multimax.layers.MultiMax` with ``axis=-1``.

    Formula:

        σ(x) = x + Σ_k t[2k]·relu(r[2k] − x)^(k+1) + t[2k+1]·relu(x − r[2k+1])^(k+1)
        y = softmax(σ(x))

    over the last axis of ``x``, with ``r`` the weight ``ranges`` and ``t``
    the weight ``ts`` (shape ``(2 * order,)``). With ``ts = 0`` the layer is
    exactly ``Activation("softmax")``.

    Example:

    >>> import numpy as np
    >>> layer = ActivationMultiMax()
    >>> np.round(keras.ops.convert_to_numpy(layer(np.array([[1.0, 2.0, 1.0]]))), 4)
    array([[0.2119, 0.5761, 0.2119]], dtype=float32)

    Args:
        **kwargs: `keras_multimax.layers.MultiMax` arguments except ``axis``
            (``modulator``, ``name``, ``dtype``).

    Call arguments:
        inputs: Floating-point scores (logits), normalised over the last axis.

    Returns:
        Probabilities with the shape of ``inputs``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(self, **kwargs):
        axis = kwargs.pop("axis", -1)
        if axis != -1:
            raise ValueError(
                "`ActivationMultiMax` normalises over the last axis only. "
                f"Received: axis={axis}"
            )
        super().__init__(axis=-1, **kwargs)

    def call(self, inputs):
        return super().call(inputs, mask=None)


def to_multimax(
    model: keras.Model,
    *,
    modulator: Any = None,
    per_head: bool = False,
    replace_softmax: bool = False,
    **kwargs,
) -> keras.Model:
    """Returns a copy of a Keras model with MultiMax in place of SoftMax attention.

    Every `keras.layers.MultiHeadAttention` becomes a
    `keras_multimax.layers.MultiMaxAttention` and every
    `keras.layers.GroupQueryAttention` a
    `keras_multimax.layers.MultiMaxGroupQueryAttention`, with the same
    configuration and a **copy** of the same projection weights (LoRA included),
    also inside nested Functional and Sequential sub-models. Every other layer
    is cloned with a copy of its weights; the original model is not modified
    and shares no variable with the result.

    With ``replace_softmax=True`` the SoftMax output layers are replaced too:
    a `keras.layers.Softmax` becomes a `keras_multimax.layers.MultiMax` over
    the same axis, an ``Activation("softmax")`` an `ActivationMultiMax`, and a
    ``Dense(..., activation="softmax")`` becomes the same ``Dense`` with a
    linear activation (same kernel and bias), renamed ``"<name>_logits"``,
    followed by an `ActivationMultiMax` that takes over the old name
    ``"<name>"``. Output names therefore do not change: a model compiled with
    a loss, metrics or loss weights keyed by output name (``{"cls": ...}``)
    keeps working, and ``model.get_layer("<name>")`` finds the layer that
    produces the probabilities. (If ``"<name>_logits"`` is taken, a numeric
    suffix is added.)

    A quantized model (``model.quantize("int8")``, ``"int4"`` or
    ``"float8"``) converts too: the projections of each twin are quantized the
    same way and receive a copy of the quantized variables (and of QLoRA
    adapters), so the outputs stay equal. A quantization the twin cannot
    repeat raises a ``ValueError`` naming the layer: convert the float model
    first, then quantize the result.

    Formula: each replaced normalisation ``softmax(s)`` becomes

        softmax(σ(s))
        σ(s) = s + Σ_k t[2k]·relu(r[2k] − s)^(k+1) + t[2k+1]·relu(s − r[2k+1])^(k+1)

    The default modulator (as everywhere in keras_multimax) starts at
    ``ts = 0``, where σ is the identity: the new model computes what the old
    one computed (up to float rounding), and fine-tuning moves ``ts`` (then
    ``ranges``) away from SoftMax. Pass ``modulator="paper"`` to start from
    the paper's small random slopes instead.

    One difference remains at ``ts = 0``: a query that may attend to no key
    at all (e.g. a padded query position) gets all-zero MultiMax weights,
    while the fused SoftMax kernel of `MultiHeadAttention` spreads them
    uniformly. Only such fully masked positions can differ.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((6, 16))
    >>> x = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    >>> x = keras.layers.GlobalAveragePooling1D()(x)
    >>> outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    >>> model = keras.Model(inputs, outputs)
    >>> new = to_multimax(model, replace_softmax=True)
    >>> type(new.get_layer("mha")).__name__, type(new.get_layer("head")).__name__
    ('MultiMaxAttention', 'ActivationMultiMax')
    >>> new.get_layer("head_logits").get_config()["activation"], new.output_names
    ('linear', ['head'])
    >>> x = np.random.default_rng(0).normal(size=(2, 6, 16))
    >>> bool(np.allclose(model(x), new(x), atol=1e-6))  # ts = 0: same outputs
    True

    KerasHub models (``keras_hub.models.Backbone`` and ``Task`` subclasses,
    e.g. ``GPT2CausalLM``, ``LlamaBackbone``, ``BertTextClassifier``,
    ``ViTImageClassifier``, ``BartSeq2SeqLM``) convert too, also nested in a
    Functional model: the result is an instance of the registered MultiMax
    class of the model's class (``MultiMaxGPT2CausalLM``), built from the
    model's config, with the same weights, LoRA adapters and quantization
    and the same preprocessor object, whose ``generate()``,
    ``call_with_cache``, ``save``, ``save_to_preset`` and ``enable_lora``
    keep working; its attention layers are the MultiMax twins of KerasHub's
    (see `keras_multimax.hub`). A family with no MultiMax class, or an
    attention class with no twin, raises a ``ValueError`` that names it and
    the hook that adds it (`keras_multimax.hub.register_model`,
    `keras_multimax.hub.register_attention`).

    `to_multimax` never returns a model without new MultiMax in it: when it
    finds nothing to convert, or a ``keras.layers.Softmax`` inside a custom
    layer that it cannot rewrite, it raises a ``ValueError`` that says so.

    Args:
        model: A built Functional (`keras.Model(inputs, outputs)`) or
            `keras.Sequential` model, or a KerasHub Backbone or Task.
            Subclassed models (a Python ``call``) cannot be rebuilt and raise
            a ``TypeError``; an unbuilt Sequential raises a ``ValueError``.
        replace_softmax: Boolean, also replace ``Softmax`` layers,
            ``Activation("softmax")`` layers and ``Dense`` layers with a
            softmax activation, as described above. Defaults to False.
        modulator: The configuration of every new modulator: a
            `keras_multimax.Modulator`, a name (``"softmax"``, the default:
            ``ts = 0``, so that the new model starts equal to the old one;
            ``"paper"``: the official initialisation) or its config dict.
        per_head: Boolean, one modulator per attention head (see
            `MultiMaxAttention`); does not apply to the output layers.
        **kwargs: The modulator's arguments one by one (``order``,
            ``ts_initializer``...), as 0.2.0 took them: deprecated, pass
            ``modulator`` instead.

    Returns:
        A new model of the same kind (a Functional subclass whose constructor
        takes ``(inputs, outputs, name)`` keeps its class; other Functional
        subclasses become a plain Functional model), compiled as the original
        if it was compiled (with a fresh optimizer).

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """
    if not isinstance(replace_softmax, bool):
        raise TypeError(
            "`replace_softmax` must be a boolean. "
            f"Received: replace_softmax={replace_softmax!r}"
        )
    validate_per_head(per_head)
    modulator = pop_legacy_arguments(kwargs, modulator, "to_multimax")
    if kwargs:
        raise TypeError(
            f"`to_multimax` got unexpected arguments {sorted(kwargs)}. "
            f"Received: {kwargs!r}"
        )
    if _is_keras_hub_model(model):
        if replace_softmax:
            raise ValueError(
                "`replace_softmax=True` applies to the output layers of "
                "Functional and Sequential models; KerasHub tasks output "
                "logits. Received: replace_softmax=True for "
                f"{type(model).__name__} {model.name!r}"
            )
        return _hub_to_multimax(model, modulator, per_head)
    converter = _Converter(modulator, per_head, replace_softmax)
    new_model = converter.convert_model(model)
    converter.check_converted(model)
    return new_model


def _is_keras_hub_model(model) -> bool:
    keras_hub = sys.modules.get("keras_hub")
    if keras_hub is None:  # a KerasHub model implies KerasHub is imported
        return False
    return isinstance(model, (keras_hub.models.Backbone, keras_hub.models.Task))


def _hub_to_multimax(model, modulator: Modulator, per_head: bool):
    # Imported here, not with this module: `import keras_multimax` does not
    # import KerasHub, and a KerasHub model means KerasHub is imported.
    from keras_multimax.hub._convert import convert_model

    return convert_model(model, modulator, per_head)


class _Converter:
    def __init__(self, modulator: Modulator, per_head: bool, replace_softmax: bool):
        self.modulator = modulator
        self.per_head = per_head
        self.replace_softmax = replace_softmax
        self.converted = 0  # layers that got MultiMax
        self.unreachable = []  # (layer, the Softmax sublayer inside it)

    def check_converted(self, model):
        """Raises if the conversion put no MultiMax in, or left some out."""
        if self.unreachable:
            found = "\n".join(
                f"- {layer.name!r} ({type(layer).__name__}) holds the Softmax "
                f"layer {softmax.name!r}"
                for layer, softmax in self.unreachable
            )
            raise ValueError(
                "`to_multimax` cannot convert the SoftMax inside these custom "
                f"layers of model {model.name!r}, which would silently stay "
                f"SoftMax:\n{found}\nIt rewrites only layers that are nodes "
                "of a Functional or Sequential model. In that layer's code, "
                "use `keras_multimax.layers.MultiMax` (same `axis`; its default "
                "modulator starts as SoftMax) in place of "
                "`keras.layers.Softmax`, or `keras_multimax.layers."
                "MultiMaxAttention` in place of the attention."
            )
        if not self.converted:
            what = (
                "attention layer or softmax output layer"
                if self.replace_softmax
                else "MultiHeadAttention or GroupQueryAttention layer (pass "
                "replace_softmax=True to convert softmax output layers)"
            )
            raise ValueError(
                f"`to_multimax` found nothing to convert in model "
                f"{model.name!r}: it has no {what}, so the result would be a "
                "plain copy without MultiMax. Received: model with layers "
                f"{[layer.name for layer in model.layers]}"
            )

    # -- models --------------------------------------------------------------

    def convert_model(self, model):
        if _is_keras_hub_model(model):
            # e.g. a KerasHub backbone used as a layer of a Functional model.
            self.converted += 1
            return _hub_to_multimax(model, self.modulator, self.per_head)
        if isinstance(model, keras.Sequential):
            return self._convert_sequential(model)
        if isinstance(model, keras.Function):
            # A Functional model: a `keras.Model` that is a graph of operations.
            return self._convert_functional(model)
        if isinstance(model, keras.Model):
            raise TypeError(
                "`to_multimax` can only rebuild Functional and Sequential "
                "models, whose layer graph it can read. Received: model "
                f"{model.name!r} of subclassed type {type(model).__name__}, "
                "whose `call()` is Python code. Instead, create the attention "
                "layers in that code as `keras_multimax.layers."
                "MultiMaxAttention` (it takes every MultiHeadAttention "
                "argument, and its default modulator starts as SoftMax) "
                "and load the old weights with `model.load_weights(...)` "
                "(skip_mismatch=True leaves the new `ranges`/`ts` as "
                "initialised), or build the model with the functional API."
            )
        raise TypeError(
            "`to_multimax` expects a `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )

    def _convert_functional(self, model):
        pairs = []
        after = {}
        taken = {op.name for op in model.operations}

        def clone_function(layer):
            if isinstance(layer, keras.Model):
                return self.convert_model(layer)
            if not isinstance(layer, keras.layers.Layer):
                # A `keras.ops` operation used in the graph (e.g. `x + y`).
                return type(layer).from_config(layer.get_config())
            new, following = self._convert_layer(layer, taken)
            pairs.append((layer, new))
            if following is not None:
                after[id(new)] = following
            return new

        def call_function(layer, *args, **kwargs):
            outputs = layer(*args, **kwargs)
            following = after.get(id(layer))
            return outputs if following is None else following(outputs)

        new_model = keras.models.clone_model(
            model, clone_function=clone_function, call_function=call_function
        )
        for old, new in pairs:
            _transfer(old, new)
        return new_model

    def _convert_sequential(self, model):
        if not model.built:
            raise ValueError(
                f"`to_multimax` needs a built model, but the Sequential model "
                f"{model.name!r} is not built: its layers have no weights to "
                "copy yet. Start it with `keras.Input(shape)`, or call "
                "`model.build(input_shape)` (or the model on a batch) first. "
                f"Received: model={model.name!r} with built=False"
            )
        pairs, new_layers = [], []
        taken = {layer.name for layer in model._layers}
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                new_layers.append(self.convert_model(layer))
                continue
            new, following = self._convert_layer(layer, taken)
            pairs.append((layer, new))
            new_layers.append(new)
            if following is not None:
                new_layers.append(following)
        first = model._layers[0] if model._layers else None
        if isinstance(first, keras.layers.InputLayer):
            inputs = keras.Input(
                batch_shape=first.batch_shape,
                dtype=first.dtype,
                name=first.name,
                optional=first.optional,
            )
            new_layers = [inputs] + new_layers
        new_model = keras.Sequential(
            new_layers, name=model.name, trainable=model.trainable
        )
        for old, new in pairs:
            _transfer(old, new)
        if model.compiled:
            new_model.compile_from_config(model.get_compile_config())
        return new_model

    # -- layers --------------------------------------------------------------

    def _convert_layer(self, layer, taken):
        """Returns (new layer, optional layer to call on its outputs).

        `taken` holds the layer names of the model being rebuilt; a new name
        given here is added to it.
        """
        cls = type(layer)
        config = layer.get_config()
        if cls in _ATTENTION_TWINS:
            twin = _ATTENTION_TWINS[cls]
            self.converted += 1
            return twin.from_config(
                {**config, "modulator": self.modulator, "per_head": self.per_head}
            ), None
        if isinstance(layer, _MULTIMAX_ATTENTION):
            return cls.from_config(config), None
        for base in _ATTENTION_TWINS:
            if isinstance(layer, base):
                raise TypeError(
                    f"Layer {layer.name!r} is a {cls.__name__}, a subclass of "
                    f"{base.__name__} with its own behaviour, which "
                    "`to_multimax` cannot carry over to a MultiMax twin. "
                    "Build it on `keras_multimax.layers.MultiMaxAttention` "
                    "(or MultiMaxGroupQueryAttention) instead."
                )
        inner = _nested_attention(layer)
        if inner is not None:
            raise TypeError(
                f"Layer {layer.name!r} ({cls.__name__}) creates the attention "
                f"layer {inner.name!r} ({type(inner).__name__}) inside its "
                "own code, which `to_multimax` cannot rewrite: it only "
                "replaces attention layers that are nodes of a Functional or "
                "Sequential model. Build that layer with `keras_multimax."
                "layers.MultiMaxAttention` (same arguments) instead."
            )
        softmax = _nested_softmax(layer)
        if softmax is not None:
            self.unreachable.append((layer, softmax))
        if self.replace_softmax:
            return self._convert_softmax(layer, config, taken)
        return cls.from_config(config), None

    def _convert_softmax(self, layer, config, taken):
        cls = type(layer)
        common = {
            "dtype": _float_policy(layer.dtype_policy),
            "modulator": self.modulator,
        }
        if cls is keras.layers.Softmax:
            self.converted += 1
            return MultiMax(axis=layer.axis, name=layer.name, **common), None
        if cls is keras.layers.Activation and _is_softmax(layer.activation):
            self.converted += 1
            return ActivationMultiMax(name=layer.name, **common), None
        if cls is keras.layers.Dense and _is_softmax(layer.activation):
            self.converted += 1
            # The activation takes over the Dense layer's name, so that the
            # model's output names (and compiled losses/metrics keyed by
            # them) stay the same; the Dense becomes "<name>_logits".
            logits_name = _unique_name(f"{layer.name}_logits", taken)
            taken.add(logits_name)
            linear = cls.from_config(
                {**config, "activation": "linear", "name": logits_name}
            )
            return linear, ActivationMultiMax(name=layer.name, **common)
        return cls.from_config(config), None


def _float_policy(policy):
    """The float policy a quantized policy ("int8_from_float32") comes from."""
    if getattr(policy, "quantization_mode", None) is None:
        return policy
    if policy.compute_dtype == policy.variable_dtype:
        return keras.DTypePolicy(policy.variable_dtype)
    return keras.DTypePolicy(f"mixed_{policy.compute_dtype}")


def _unique_name(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _is_softmax(activation) -> bool:
    return keras.activations.serialize(activation) == "softmax"


def _nested_softmax(layer):
    """A `keras.layers.Softmax` inside `layer`, other than an attention's own."""
    subs = list(layer._flatten_layers(include_self=False))
    owned = {
        id(sub._softmax) for sub in subs if isinstance(sub, tuple(_ATTENTION_TWINS))
    }
    for sub in subs:
        if isinstance(sub, keras.layers.Softmax) and id(sub) not in owned:
            return sub
    return None


def _nested_attention(layer):
    for sub in layer._flatten_layers(include_self=False):
        if isinstance(sub, tuple(_ATTENTION_TWINS)):
            return sub
    return None


def _transfer(old, new):
    """`transfer_state` of one layer of the rebuilt graph."""
    if not old.weights:
        return
    created = () if modulator_variables(old) else modulator_variables(new)
    try:
        transfer_state(old, new, created=created)
    except ValueError as error:
        raise ValueError(
            f"`to_multimax` could not carry layer {old.name!r} "
            f"({type(old).__name__}) into its copy: {error}"
        ) from error
