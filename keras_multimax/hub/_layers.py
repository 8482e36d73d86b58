"""MultiMax inside the attention layers of a built KerasHub model, in place.

Three kinds of KerasHub attention are reached, by one mechanism each, for
every family built on them:

- ``keras.layers.MultiHeadAttention`` and its subclasses that keep the
  parent's ``_compute_attention``/``_masked_softmax`` (plain MHA inside
  ``TransformerEncoder`` and the ViT blocks, ``CachedMultiHeadAttention`` in
  ``TransformerDecoder``, Whisper's and Moonshine's subclasses), and
  ``keras.layers.GroupQueryAttention``: the layer's class becomes a subclass
  of both its class and `keras_multimax.layers.MultiMaxAttention` (or
  `MultiMaxGroupQueryAttention`), whose score normalisation is MultiMax; the
  layer keeps its own ``call`` (the KV cache) and gets ``ranges``/``ts``.
- Family attention layers holding a ``keras.layers.Softmax`` sublayer
  (Llama, Mistral, Gemma, Qwen, Phi-3, Falcon, Bloom, GPT-NeoX, DeBERTa-v3...):
  the ``Softmax`` is replaced by an `AttentionMultiMax` over the same axis,
  and the layer's class becomes a subclass whose fused-attention check is
  False, so that no backend takes the fused SoftMax path
  (``ops.dot_product_attention``) around the MultiMax sublayer.
- Anything else whose class name says attention, or an attention subclass
  that overrides how scores are normalised, cannot be reached: it is
  reported, never silently left as SoftMax.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from typing import Any

import keras

from keras_multimax import ops as mm_ops
from keras_multimax.layers.multimax import MultiMax
from keras_multimax.layers.multimax_attention import AttentionModulator
from keras_multimax.layers.multimax_attention import MultiMaxAttention
from keras_multimax.layers.multimax_group_query_attention import (
    MultiMaxGroupQueryAttention,
)
from keras_multimax.modulator import MODULATOR_ARGUMENTS
from keras_multimax.modulator import Modulator

# The KerasHub helpers that let a layer skip its own softmax for a fused
# SoftMax kernel (`ops.dot_product_attention`). Converted layers see them as
# always False.
_FUSED_CHECKS = ("fused_attention_op_available",)

# Softmax attention base -> (MultiMax twin, attribute holding the head count).
_TWINS = {
    keras.layers.MultiHeadAttention: (MultiMaxAttention, "_num_heads"),
    keras.layers.GroupQueryAttention: (MultiMaxGroupQueryAttention, "num_query_heads"),
}
# The methods the twins replace; a subclass that overrides one of them has its
# own way of normalising the scores, which a twin would drop.
_TWIN_METHODS = ("_compute_attention", "_masked_softmax")
# Attributes that give a family layer's number of query heads (per_head).
_HEAD_COUNTS = ("num_query_heads", "num_heads", "_num_heads", "num_attention_heads")

# The options of a conversion: per_head and the modulator's arguments, kept
# flat in KerasHub models' config (as 0.2.0 wrote them).
OPTIONS = ("per_head", *MODULATOR_ARGUMENTS)


@keras.saving.register_keras_serializable(package="keras_multimax")
class AttentionMultiMax(MultiMax):
    """MultiMax in place of the ``keras.layers.Softmax`` of an attention layer.

    `keras_multimax.layers.MultiMax` (masks applied after the modulation,
    ``mask`` passed as the ``Softmax`` would get it), plus optional per-head
    modulators: with ``num_heads`` set, ``ranges``/``ts`` have shape
    ``(num_heads, 2 * order)`` and are laid over the head axes of the scores,
    i.e. every axis between the batch axis and the last two (query, key)
    axes, in row-major order. So Llama's ``(B, heads, T, S)`` scores and
    Gemma's ``(B, kv_heads, groups, T, S)`` both get one modulator per query
    head.

    Formula:

        MultiMax(s) = softmax(σ(s))
        σ(s) = s + Σ_k t[2k]·relu(r[2k] − s)^(k+1) + t[2k+1]·relu(s − r[2k+1])^(k+1)

    over the last axis of the scores ``s``; with ``ts = 0`` it is the
    ``Softmax`` it replaces, except that a query with no visible key gets
    all-zero weights (uniform ones under ``Softmax``).

    Example:

    >>> import numpy as np
    >>> layer = AttentionMultiMax(num_heads=2)
    >>> scores = np.zeros((1, 2, 3, 3), "float32")
    >>> tuple(layer(scores).shape), tuple(layer.ts.shape)
    ((1, 2, 3, 3), (2, 4))

    Args:
        num_heads: Optional integer: one modulator per head. Defaults to
            ``None`` (one modulator shared by all heads).
        **kwargs: `keras_multimax.layers.MultiMax` arguments (``axis``,
            ``modulator``, ``name``, ``dtype``).

    Call arguments:
        inputs: Attention scores, normalised over the last axis.
        mask: Optional mask broadcastable to ``inputs`` (True keeps a key).

    Returns:
        Attention weights with the shape of ``inputs``.

    Reference:
        Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention
        Learning", ICML 2024.
    """

    def __init__(self, num_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_heads is not None and (
            isinstance(num_heads, bool)
            or not isinstance(num_heads, int)
            or num_heads < 1
        ):
            raise ValueError(
                "`num_heads` must be None or an integer >= 1. "
                f"Received: num_heads={num_heads!r}"
            )
        if num_heads is not None and self.axis not in (-1,):
            raise ValueError(
                "Per-head modulators (`num_heads`) need `axis=-1`. "
                f"Received: axis={self.axis!r}"
            )
        self.num_heads = num_heads

    def build(self, input_shape=None):
        # Built when its attention layer is converted, before any call: the
        # scores' shape is not needed (the axis is checked by `multimax`).
        self._build_modulator(() if self.num_heads is None else (self.num_heads,))

    def call(self, inputs, mask=None):
        ranges, ts = self.ranges, self.ts
        if self.num_heads is not None:
            head_axes = tuple(inputs.shape[1:-2])
            if None in head_axes or math.prod(head_axes) != self.num_heads:
                raise ValueError(
                    f"`AttentionMultiMax` {self.name!r} has {self.num_heads} "
                    "per-head modulators, but the head axes of the scores "
                    "(between batch and the query/key axes) are "
                    f"{head_axes}. Received: inputs.shape={inputs.shape}"
                )
            shape = head_axes + (1, 1, 2 * self.order)
            ranges = keras.ops.reshape(ranges, shape)
            ts = keras.ops.reshape(ts, shape)
        return mm_ops.multimax(inputs, ranges, ts, axis=self.axis, mask=mask)

    def get_config(self):
        config = super().get_config()
        config["num_heads"] = self.num_heads
        return config


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """The conversion options with defaults; bad values raise here, early.

    Returns ``per_head`` and the `Modulator`'s config, flat (the ``multimax``
    entry of a converted KerasHub model's config).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"Unknown MultiMax options {unknown}; the options are "
            f"{list(OPTIONS)}. Received: {options!r}"
        )
    per_head = options.get("per_head", False)
    if not isinstance(per_head, bool):
        raise TypeError(
            f"`per_head` must be a boolean. Received: per_head={per_head!r}"
        )
    modulator = Modulator(**{k: v for k, v in options.items() if k != "per_head"})
    return {"per_head": per_head, **modulator.get_config()}


def conversion_options(modulator: Modulator, per_head: bool) -> dict[str, Any]:
    """`validate_options` of a `Modulator` and ``per_head``."""
    return validate_options({"per_head": per_head, **modulator.get_config()})


def _never_fused():
    return False


def _uses_name(code: types.CodeType, names) -> bool:
    if any(name in code.co_names for name in names):
        return True
    return any(
        _uses_name(c, names) for c in code.co_consts if isinstance(c, types.CodeType)
    )


_UNFUSED_GLOBALS: dict[str, dict] = {}


def _unfused_globals(fn) -> dict:
    """A copy of `fn`'s module globals with the fused checks always False."""
    new = _UNFUSED_GLOBALS.get(fn.__module__)
    if new is None:
        new = dict(fn.__globals__)
        new.update(dict.fromkeys(_FUSED_CHECKS, _never_fused))
        _UNFUSED_GLOBALS[fn.__module__] = new
    return new


def _unfused_methods(cls) -> dict[str, Any]:
    """Copies of `cls`'s methods that call a fused-attention check, with the
    check bound to ``False``.

    KerasHub's Llama-style layers call ``ops.dot_product_attention`` (a fused
    SoftMax) instead of their ``Softmax`` sublayer whenever
    ``fused_attention_op_available()`` is True (JAX, torch); in a converted
    layer that check is False, whatever the backend.
    """
    methods = {}
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if name in methods or name.startswith("__"):
                continue
            resolved = getattr(cls, name, None)
            fn = getattr(resolved, "__func__", resolved)
            if fn is not value or not isinstance(fn, types.FunctionType):
                continue
            if not _uses_name(fn.__code__, _FUSED_CHECKS):
                continue
            module = fn.__module__
            new = types.FunctionType(
                fn.__code__,
                _unfused_globals(fn),
                fn.__name__,
                fn.__defaults__,
                fn.__closure__,
            )
            new.__kwdefaults__ = fn.__kwdefaults__
            new.__qualname__ = fn.__qualname__
            new.__doc__ = fn.__doc__
            new.__module__ = module
            methods[name] = new
    return methods


def _no_paged_attention(self, *args, **kwargs):
    raise ValueError(
        f"Layer {self.path!r} ({type(self).__name__}) computes MultiMax "
        "attention, which vLLM paged attention (a SoftMax kernel) cannot "
        "serve. Serve it without the vLLM context."
    )


class ConvertedAttention:
    """Marker of an attention layer converted in place by `convert_layers`."""


@functools.cache
def converted_class(cls):
    """The in-place MultiMax class of the attention class `cls` (cached)."""
    body = _unfused_methods(cls)
    if hasattr(cls, "_compute_vllm_attention"):
        body["_compute_vllm_attention"] = _no_paged_attention
    bases = (ConvertedAttention, cls)
    base, (twin, _) = _twin_of_class(cls)
    if base is not None:
        # The twin's score normalisation, the class's own `call` (the cache).
        bases = (
            (ConvertedAttention, twin)
            if cls is base
            else (ConvertedAttention, twin, cls)
        )
    body["__module__"] = cls.__module__
    body["__doc__"] = (
        f"`{cls.__name__}` with MultiMax attention weights (keras_multimax)."
    )
    return type(f"MultiMax{cls.__name__}", bases, body)


def _twin_of_class(cls):
    for base, twin in _TWINS.items():
        if issubclass(cls, base):
            return base, twin
    return None, (None, None)


def _twin_of(layer):
    return _twin_of_class(type(layer))


def _overrides(cls, base, names) -> list[str]:
    return [n for n in names if getattr(cls, n) is not getattr(base, n)]


def _softmax_attributes(layer) -> list[str]:
    children = {id(child) for child in layer._layers}
    return [
        name
        for name, value in vars(layer).items()
        if type(value) is keras.layers.Softmax and id(value) in children
    ]


def _describe(layer) -> str:
    return f"{type(layer).__name__} at {layer.path or layer.name!r}"


# Names whose use in a layer's own code means it normalises scores itself.
_INLINE_SOFTMAX = ("softmax", "dot_product_attention", "scaled_dot_product_attention")


@functools.cache
def _computes_softmax(cls) -> bool:
    """Whether code of `cls` (outside Keras itself) calls a softmax or a fused
    attention kernel (``ops.softmax``, ``ops.dot_product_attention``...)."""
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "keras":
            continue
        for value in vars(klass).values():
            fn = getattr(value, "__func__", value)
            if isinstance(fn, types.FunctionType) and _uses_name(
                fn.__code__, _INLINE_SOFTMAX
            ):
                return True
    return False


def find_attention(model):
    """Sorts the attention layers of `model`.

    Returns ``(mha, family, unreachable, converted)``: lists of layers of the
    MHA kind, of the Softmax-sublayer kind, that cannot be reached (with the
    reason), and already converted.
    """
    mha, family, unreachable, converted = [], [], [], []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(
            layer, (ConvertedAttention, AttentionModulator, AttentionMultiMax)
        ):
            converted.append(layer)
            continue
        base, _ = _twin_of(layer)
        if base is not None:
            own = _overrides(type(layer), base, _TWIN_METHODS)
            if own:
                unreachable.append(
                    (layer, f"overrides {', '.join(own)} of {base.__name__}")
                )
            else:
                mha.append(layer)
        elif _softmax_attributes(layer):
            family.append(layer)
    reached = mha + family + converted
    for layer in model._flatten_layers(include_self=False):
        if "attention" not in type(layer).__name__.lower():
            continue
        if not _computes_softmax(type(layer)):
            continue  # e.g. XLNet's attention-mask builder
        if any(layer is r for r in reached) or any(layer is u for u, _ in unreachable):
            continue
        inner = list(layer._flatten_layers(include_self=False))
        if any(sub is r for sub in inner for r in reached):
            continue  # a container of reached attention (e.g. a block)
        unreachable.append(
            (
                layer,
                "computes its attention weights inline (ops.softmax or a "
                "fused dot_product_attention, no Softmax sublayer)",
            )
        )
    return mha, family, unreachable, converted


def unreachable_error(unreachable, what: str) -> ValueError:
    lines = "\n".join(f"- {_describe(layer)}: {why}" for layer, why in unreachable)
    return ValueError(
        f"`to_multimax` cannot put MultiMax into every attention layer of "
        f"{what}; these would silently stay SoftMax:\n{lines}\n"
        "MultiMax reaches `keras.layers.MultiHeadAttention` (and subclasses "
        "that keep its score computation, such as KerasHub's "
        "`CachedMultiHeadAttention`) and KerasHub attention layers that "
        "normalise through a `keras.layers.Softmax` sublayer."
    )


def _head_count(layer) -> int:
    for name in _HEAD_COUNTS:
        value = getattr(layer, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"`per_head=True` needs the number of heads of {_describe(layer)}, but "
        f"it has none of the attributes {list(_HEAD_COUNTS)}. Use "
        "per_head=False for this model."
    )


def _modulator(options) -> Modulator:
    return Modulator(**{k: v for k, v in options.items() if k != "per_head"})


class _Unlocked:
    """Lets a built layer take new state, as Keras' own `enable_lora` does."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.locked = self.layer._tracker.locked
        self.layer._tracker.unlock()

    def __exit__(self, *exc):
        if self.locked:
            self.layer._tracker.lock()


def _scope(path: str) -> contextlib.ExitStack:
    """The nested name scopes of `path` ("a/b"), so that new weights get
    paths under it."""
    stack = contextlib.ExitStack()
    for part in filter(None, path.split("/")):
        stack.enter_context(keras.name_scope(part))
    return stack


def _parent_path(layer) -> str:
    return (layer.path or "").rpartition("/")[0]


def _convert_mha(layer, options):
    _, (_, heads_attribute) = _twin_of(layer)
    layer.__class__ = converted_class(type(layer))
    layer._init_attention_modulator(options["per_head"], _modulator(options))
    with _Unlocked(layer), _scope(_parent_path(layer)):
        layer._build_attention_modulator(getattr(layer, heads_attribute))


def _convert_family(layer, options):
    names = _softmax_attributes(layer)
    num_heads = _head_count(layer) if options["per_head"] else None
    layer.__class__ = converted_class(type(layer))
    modulator = _modulator(options)
    with _Unlocked(layer):
        for name in names:
            softmax = getattr(layer, name)
            multimax = AttentionMultiMax(
                axis=softmax.axis,
                num_heads=num_heads,
                dtype=softmax.dtype_policy,
                # Named after the attribute, not the Softmax (often unnamed,
                # "softmax_12"), so that weight paths do not depend on how
                # many layers were built before.
                name=name.lstrip("_"),
                modulator=modulator,
            )
            layer._tracker.untrack(softmax)
            setattr(layer, name, multimax)
            with _scope(layer.path or ""):
                multimax.build(None)


def convert_layers(model, options, what: str):
    """Puts MultiMax into every attention layer of the built `model`, in place.

    Raises a ``ValueError`` naming every attention layer it cannot reach, or
    saying there is nothing to convert, before changing anything.
    """
    mha, family, unreachable, converted = find_attention(model)
    if unreachable:
        raise unreachable_error(unreachable, what)
    if not mha and not family:
        raise ValueError(
            f"`to_multimax` found no SoftMax attention to convert in {what}"
            + (
                f" (its {len(converted)} attention layers are MultiMax already)."
                if converted
                else "."
            )
        )
    for layer in mha:
        _convert_mha(layer, options)
    for layer in family:
        _convert_family(layer, options)
    return mha + family


def modulator_variables(model) -> list:
    """The ``ranges``/``ts`` variables of every MultiMax layer of `model`."""
    found = []
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, (AttentionModulator, MultiMax)) and hasattr(
            layer, "ranges"
        ):
            found += [layer.ranges, layer.ts]
    return found
