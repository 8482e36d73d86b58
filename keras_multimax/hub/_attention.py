"""MultiMax twins of KerasHub attention classes, and the one place a layer becomes one.

A *twin* is a subclass, written in keras_multimax, of one KerasHub attention
class: it overrides the method where that class normalises its scores (the
one KerasHub's own families override, ``_compute_attention``) so that the
weights are MultiMax, never SoftMax (no fused SoftMax kernel either), and
owns the modulator's ``ranges``/``ts``. `register_attention` records which
twin serves which class; `multimax_twin` builds the twin of a built layer,
with its state, and `enable_multimax_in` puts the twins where the layers
were in a model's blocks.

Two kinds of twin cover KerasHub 0.32 (``keras_multimax/hub/_twins.py``):

- `MultiHeadAttentionTwin`: for subclasses of `keras.layers.MultiHeadAttention`;
  the twin is also a `keras_multimax.layers.MultiMaxAttention`, whose
  ``_compute_attention`` and ``_masked_softmax`` compute MultiMax and which
  owns ``ranges``/``ts`` itself.
- `SoftmaxSublayerTwin`: for family layers (Llama, Gemma, Falcon...) that
  normalise through a ``keras.layers.Softmax`` sublayer; the twin puts an
  `AttentionMultiMax` (which owns ``ranges``/``ts``) where the ``Softmax``
  was, and overrides ``_compute_attention`` where KerasHub's has a fused
  SoftMax branch.
"""

from __future__ import annotations

import contextlib
import math

import keras

from keras_multimax import ops as mm_ops
from keras_multimax._transfer import modulator_variables
from keras_multimax._transfer import transfer_state
from keras_multimax.layers.multimax import MultiMax
from keras_multimax.layers.multimax_attention import use_blockwise_attention
from keras_multimax.layers.multimax_attention import validate_per_head
from keras_multimax.models._blocks import validate_positive
from keras_multimax.modulator import Modulator
from keras_multimax.modulator import get as get_modulator

__all__ = [
    "AttentionMultiMax",
    "MultiHeadAttentionTwin",
    "MultiMaxTwin",
    "SoftmaxSublayerTwin",
    "attention_twin",
    "multimax_twin",
    "register_attention",
]


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
    ``Softmax`` it replaces.

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
        if num_heads is not None:
            validate_positive("num_heads", num_heads)
        if num_heads is not None and self.axis != -1:
            raise ValueError(
                "Per-head modulators (`num_heads`) need `axis=-1`. "
                f"Received: axis={self.axis!r}"
            )
        self.num_heads = num_heads

    def build(self, input_shape=None):
        # Built by its attention layer's twin before any call: the scores'
        # shape is not needed (the axis is checked by `multimax`).
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


@contextlib.contextmanager
def _new_state(layer):
    """Lets the built `layer` take new state, as Keras' own upgrades of built
    layers do (`Dense.enable_lora`, `Layer.quantize`): Keras has no public
    route for it, and locks a layer's tracker once it is built."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


class MultiMaxTwin:
    """Base of the MultiMax twins of attention classes (see `register_attention`).

    A twin subclasses the attention class it serves and this base, and
    overrides the method where that class normalises its scores.
    `multimax_twin` builds it from the original layer's config (`_twin_config`)
    and build config, then calls `_build_multimax` once to create the
    modulator. It must not need any other state than its parent's and the
    modulator.
    """

    # For a parent whose `get_config` is missing or incomplete (KerasHub never
    # serialises its attention layers: its blocks create them in `build`):
    # the parent's constructor arguments, each read from the attribute where
    # the parent's `__init__` stores it.
    constructor_arguments: dict[str, str] = {}

    @classmethod
    def _twin_config(cls, layer, modulator: Modulator, per_head: bool) -> dict:
        """The config the twin of ``layer`` is built from: ``layer.get_config()``,
        or the base layer's config and `constructor_arguments`."""
        if not cls.constructor_arguments:
            return layer.get_config()
        # What `keras.layers.Layer.get_config` writes for every layer.
        config = {
            "name": layer.name,
            "trainable": layer.trainable,
            "dtype": layer.dtype_policy,
        }
        for argument, attribute in cls.constructor_arguments.items():
            config[argument] = getattr(layer, attribute)
        return config

    def _build_multimax(self, modulator: Modulator, per_head: bool) -> None:
        """Creates the modulator of this built layer (``ranges``/``ts``)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define `_build_multimax`."
        )

    def _compute_vllm_attention(self, *args, **kwargs):
        # KerasHub routes to this while serving through vLLM's paged
        # attention, a SoftMax kernel.
        raise ValueError(
            f"Layer {self.path!r} ({type(self).__name__}) computes MultiMax "
            "attention, which vLLM paged attention (a SoftMax kernel) cannot "
            "serve. Serve it without the vLLM context."
        )


class MultiHeadAttentionTwin(MultiMaxTwin):
    """Twin base of `keras.layers.MultiHeadAttention` subclasses.

    Use with `keras_multimax.layers.MultiMaxAttention` before the KerasHub
    class: ``class MultiMaxX(MultiHeadAttentionTwin, MultiMaxAttention, X)``.
    MultiMaxAttention's ``_compute_attention`` and ``_masked_softmax``
    normalise with MultiMax on every path; ``ranges``/``ts`` (per head with
    ``per_head``) are weights of the layer itself, which its ``build``
    creates from the ``modulator`` and ``per_head`` of its config.
    """

    @classmethod
    def _twin_config(cls, layer, modulator, per_head):
        config = super()._twin_config(layer, modulator, per_head)
        return {**config, "modulator": modulator, "per_head": per_head}

    def _build_multimax(self, modulator, per_head):
        # MultiMaxAttention's `build` created the modulator already.
        pass


class SoftmaxSublayerTwin(MultiMaxTwin):
    """Twin base of layers that normalise through a ``keras.layers.Softmax`` sublayer.

    The subclass names the attribute holding that ``Softmax``
    (``softmax_attribute``) and the one holding the number of query heads
    (``heads_attribute``, for ``per_head``). `_build_multimax` puts an
    `AttentionMultiMax` (same axis and dtype) at that attribute, so that the
    parent's code calling it, and the twin's `multimax`, get MultiMax
    weights; a parent with a fused SoftMax branch (``ops.dot_product_attention``)
    needs its ``_compute_attention`` overridden as well.
    """

    softmax_attribute: str = "_softmax"
    heads_attribute: str = "num_query_heads"

    @property
    def multimax(self) -> AttentionMultiMax:
        """The `AttentionMultiMax` that normalises this layer's scores."""
        return getattr(self, self.softmax_attribute)

    def _use_blockwise(self, scores_shape: tuple, dropout: float = 0.0) -> bool:
        """Whether a call computes its attention block by block.

        KerasHub's layers take no ``flash_attention`` argument: they follow
        Keras' global switch, and so do their twins. With
        `keras.config.disable_flash_attention()` the scores are materialised;
        with the switch on (Keras' default) `use_blockwise_attention` chooses
        by the size of the scores, as for the MultiMax layers.
        """
        return use_blockwise_attention(
            keras.config.is_flash_attention_enabled(), scores_shape, dropout
        )

    def _blockwise_attention(self, query, key, value, attention_mask, scale):
        """`ops.multimax_dot_product_attention` of ``(B, T, H, D)`` queries and
        ``(B, S, H_kv, D)`` keys and values, with a ``(B, T, S)`` mask, with this
        layer's modulator; returned in the compute dtype."""
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, :, :]
        output = mm_ops.multimax_dot_product_attention(
            query,
            key,
            value,
            mask=attention_mask,
            scale=scale,
            ranges=self.multimax.ranges,
            ts=self.multimax.ts,
        )
        return keras.ops.cast(output, self.compute_dtype)

    def _build_multimax(self, modulator, per_head):
        name = self.softmax_attribute
        softmax = getattr(self, name)
        if not isinstance(softmax, keras.layers.Softmax):
            raise TypeError(
                f"{type(self).__name__} expects a `keras.layers.Softmax` at "
                f"`{name}` of layer {self.path!r}. Received: {softmax!r}"
            )
        multimax = AttentionMultiMax(
            axis=softmax.axis,
            num_heads=getattr(self, self.heads_attribute) if per_head else None,
            # The layer's policy, not the Softmax's float32: MultiMax computes
            # in float32 whatever the policy (the op upcasts float16 and
            # bfloat16) and returns the compute dtype, which the layer's code
            # casts the weights to anyway.
            dtype=self.dtype_policy,
            # Named after the attribute, not the Softmax (often unnamed,
            # "softmax_12"), so that weight paths do not depend on how many
            # layers were built before.
            name=name.lstrip("_"),
            modulator=modulator,
        )
        # In the layer's name scope: "<path>/<attribute>/ts".
        with _new_state(self), keras.name_scope(self.name, caller=self):
            self._tracker.untrack(softmax)
            setattr(self, name, multimax)
            multimax.build()


# KerasHub attention class -> its MultiMax twin.
_TWINS: dict[type, type] = {}


def register_attention(kerashub_class: type, multimax_class: type) -> None:
    """Registers the MultiMax twin of an attention class.

    `keras_multimax.convert.to_multimax` (and every MultiMax KerasHub model
    built from its config) puts a ``multimax_class`` (`multimax_twin`) in
    place of each attention layer of exactly the class ``kerashub_class``
    (`enable_multimax_in`).
    keras_multimax registers the twins of the KerasHub 0.32 classes it
    supports; this hook adds another (a new KerasHub family, or your own
    attention layer), like Hugging Face's ``AttentionInterface.register``.

    Example:

    >>> import keras
    >>> class MyAttention(keras.layers.Layer):
    ...     def build(self, input_shape):
    ...         self.num_heads = 1
    ...         self._softmax = keras.layers.Softmax()
    ...     def call(self, x):
    ...         return self._softmax(keras.ops.einsum("btd,bsd->bts", x, x)) @ x
    >>> class MultiMaxMyAttention(SoftmaxSublayerTwin, MyAttention):
    ...     heads_attribute = "num_heads"
    >>> register_attention(MyAttention, MultiMaxMyAttention)
    >>> layer = MyAttention(name="attention")
    >>> _ = layer(keras.ops.ones((1, 3, 4)))
    >>> twin = multimax_twin(layer)
    >>> type(twin).__name__, twin.multimax.ts.path
    ('MultiMaxMyAttention', 'attention/softmax/ts')

    Args:
        kerashub_class: The attention class, a `keras.layers.Layer` subclass.
        multimax_class: Its twin: a subclass of ``kerashub_class`` and of
            `MultiMaxTwin` (`MultiHeadAttentionTwin` or `SoftmaxSublayerTwin`
            do the bookkeeping) that normalises with MultiMax.
    """
    if not (
        isinstance(kerashub_class, type) and issubclass(kerashub_class, keras.Layer)
    ):
        raise TypeError(
            "`kerashub_class` must be a `keras.layers.Layer` subclass. "
            f"Received: kerashub_class={kerashub_class!r}"
        )
    if not (
        isinstance(multimax_class, type)
        and issubclass(multimax_class, kerashub_class)
        and issubclass(multimax_class, MultiMaxTwin)
    ):
        raise TypeError(
            "`multimax_class` must subclass both `kerashub_class` "
            f"({kerashub_class.__name__}) and `keras_multimax.hub.MultiMaxTwin`. "
            f"Received: multimax_class={multimax_class!r}"
        )
    _TWINS[kerashub_class] = multimax_class


def attention_twin(kerashub_class: type) -> type | None:
    """The twin registered for exactly ``kerashub_class``, or None."""
    return _TWINS.get(kerashub_class)


def multimax_twin(
    layer: keras.layers.Layer, modulator=None, per_head: bool = False
) -> keras.layers.Layer:
    """The MultiMax twin of a built attention layer, with the layer's state.

    A new layer of the class registered for ``type(layer)``
    (`register_attention`), built the way Keras rebuilds a saved layer: from
    the layer's config (``get_config()``, or its constructor arguments, see
    `MultiMaxTwin.constructor_arguments`) and ``get_build_config()``, under the same
    parent path, so that its variables have the paths of the layer's. It
    takes the layer's quantization, LoRA adapters and weights
    (`keras_multimax._transfer.transfer_state`), then creates its modulator
    (``ranges``/``ts``, under its path). ``layer`` itself is unchanged; a
    MultiMax backbone puts the twin where the layer was
    (`enable_multimax_in`).

    Example:

    >>> import keras_hub
    >>> layer = keras_hub.layers.CachedMultiHeadAttention(2, 4)
    >>> layer.build((None, 3, 8), (None, 3, 8))
    >>> twin = multimax_twin(layer, per_head=True)
    >>> type(twin).__name__, tuple(twin.ts.shape)
    ('MultiMaxCachedMultiHeadAttention', (2, 4))

    Args:
        layer: A built layer whose class has a registered twin.
        modulator: The modulator's configuration (`keras_multimax.Modulator`,
            a name or a config dict; default ``ts = 0``, where the twin
            computes what ``layer`` computes).
        per_head: Boolean, one modulator per query head.

    Returns:
        The twin, built.
    """
    twin_class = attention_twin(type(layer))
    if twin_class is None:
        raise ValueError(
            f"No MultiMax twin is registered for the attention class "
            f"{_qualified(type(layer))} of layer {layer.path or layer.name!r}. "
            "Write one (a subclass that normalises with MultiMax, see "
            "`keras_multimax.hub.SoftmaxSublayerTwin`) and register it with "
            "`keras_multimax.hub.register_attention(kerashub_class, "
            "multimax_class)`."
        )
    if not layer.built:
        raise ValueError(
            f"`multimax_twin` takes built layers; layer {layer.name!r} is not "
            "built yet. Call it on the layer after `build` (or after a call)."
        )
    modulator = get_modulator(modulator)
    validate_per_head(per_head)
    twin = twin_class.from_config(twin_class._twin_config(layer, modulator, per_head))
    # The layer's variables were created under "<parent path>/<name>/".
    parent = layer.path.rpartition("/")[0] if layer.path else ""
    with _parent_scope(parent):
        twin.build_from_config(layer.get_build_config())
        twin._build_multimax(modulator, per_head)
    transfer_state(layer, twin, created=modulator_variables(twin))
    return twin


@contextlib.contextmanager
def _parent_scope(path: str):
    """Keras' name scope ``path`` (``"a/b/c"``), for a layer built outside
    its parent's ``build``."""
    if not path:
        yield
        return
    head, _, last = path.rpartition("/")
    with keras.name_scope(last, override_parent=head or None):
        yield


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _owns_softmax(layer) -> bool:
    return any(isinstance(sub, keras.layers.Softmax) for sub in layer._layers)


def find_attention(layers) -> tuple[list, list]:
    """The attention layers among `layers`: ``(with a twin, without one)``.

    Attention layers are those of a class with a registered twin, and any
    other `keras.layers.MultiHeadAttention`, `keras.layers.GroupQueryAttention`
    or layer with a ``keras.layers.Softmax`` sublayer. Layers that are twins
    already are left out.
    """
    upgrade, missing = [], []
    for layer in layers:
        if isinstance(layer, MultiMaxTwin):
            continue
        if attention_twin(type(layer)) is not None:
            upgrade.append(layer)
        elif isinstance(
            layer, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)
        ) or _owns_softmax(layer):
            missing.append(layer)
    return upgrade, missing


def describe(layers) -> str:
    return "\n".join(
        f"- {layer.path or layer.name!r}: {_qualified(type(layer))}" for layer in layers
    )


def enable_multimax_in(model, modulator: Modulator, per_head: bool) -> list:
    """Puts the `multimax_twin` of every attention layer of `model` in its place.

    The one place where a KerasHub model changes. Each attention layer with a
    registered twin is held by an attribute of its parent (the transformer
    block that created it in its ``build``, e.g. ``_self_attention_layer``):
    that attribute is set to the twin, and the parent's list of tracked
    layers holds the twin at the layer's position, so that the weights keep
    their order. The block's ``call`` then calls the twin. Attention layers
    with no registered twin (see `find_attention`) raise before anything
    changes, naming their classes and `register_attention`, as does a model
    with no attention at all, or one whose parent holds it otherwise than in
    an attribute. Returns the twins.
    """
    upgrade, missing = find_attention(model._flatten_layers(include_self=False))
    if missing:
        raise ValueError(
            f"{type(model).__name__} {model.name!r} has attention layers "
            f"with no registered MultiMax twin, which would stay SoftMax:\n"
            f"{describe(missing)}\nWrite a twin of each class and register it "
            "with `keras_multimax.hub.register_attention(kerashub_class, "
            "multimax_class)`."
        )
    if not upgrade:
        raise ValueError(
            f"{type(model).__name__} {model.name!r} has no attention layer "
            "with a registered MultiMax twin: there is nothing to convert."
        )
    parents = {
        id(child): parent
        for parent in model._flatten_layers(include_self=True)
        for child in parent._flatten_layers(include_self=False, recursive=False)
    }
    places = [_place_of(parents.get(id(layer)), layer, model) for layer in upgrade]
    twins = []
    for layer, (parent, attributes) in zip(upgrade, places):
        twin = multimax_twin(layer, modulator, per_head)
        with _new_state(parent):
            parent._tracker.replace_tracked_value("layers", layer, twin)
            for attribute in attributes:
                setattr(parent, attribute, twin)
        twins.append(twin)
    return twins


def _place_of(parent, layer, model) -> tuple:
    """`parent` (the layer of `model` that tracks `layer`) and its attributes
    holding `layer`."""
    if parent is None:
        raise ValueError(
            f"The attention layer {layer.path!r} has no parent in "
            f"{type(model).__name__} {model.name!r}."
        )
    attributes = [name for name, value in vars(parent).items() if value is layer]
    if isinstance(parent, keras.Model) or not attributes:
        raise ValueError(
            f"The attention layer {layer.path!r} is held by "
            f"{type(parent).__name__} {parent.name!r} otherwise than in "
            "an attribute of a layer (as a node of a Functional graph, "
            "or in a list or a dict), where its MultiMax twin cannot "
            "take its place. Hold it in a block layer that creates it "
            "in `build`, as KerasHub's transformer blocks do."
        )
    return parent, attributes
