"""Attention with a key/value cache: KerasHub's `CachedMultiHeadAttention` call, once.

`CachedAttention` adds the cache of KerasHub's
``keras_hub.layers.CachedMultiHeadAttention`` (same call arguments, same
``[B, 2, S, heads, head_dim]`` layout, same three modes) to any subclass of
`keras.layers.MultiHeadAttention`. It is the one cached attention of
keras_multimax: the model builders' blocks use `CachedMultiHeadAttention` and
`CachedMultiMaxAttention` below, and the MultiMax twins of KerasHub's cached
attention classes (`keras_multimax.hub`) use it too, so that cached and
uncached calls of a layer run its own ``_compute_attention``: MultiMax in a
MultiMax layer, at every decoding step.
"""

from __future__ import annotations

import keras

from keras_multimax.layers.multimax_attention import MultiMaxAttention

__all__ = ["CachedAttention", "CachedMultiHeadAttention", "CachedMultiMaxAttention"]


class CachedAttention:
    """Mixin: the key/value cache of KerasHub's ``CachedMultiHeadAttention``.

    For a subclass of `keras.layers.MultiHeadAttention` (before it in the
    bases). Without ``cache`` the call is the layer's own. With ``cache``
    (``[B, 2, S, heads, head_dim]``: keys at index 0, values at 1):

    - ``cache_update_index=None``: the cached keys and values are used as
      they are (cross-attention; ``value`` and ``key`` are ignored);
    - otherwise the projections of ``key``/``value`` (``S*`` positions) are
      written into the cache at ``cache_update_index`` first.

    The query attends to all ``S`` cached positions through the layer's
    ``_compute_attention``, as masked by ``attention_mask`` (``(B, T, S)``).
    A cached call returns ``(output, cache)``, or ``(output, scores,
    cache)`` with ``return_attention_scores=True``.
    """

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
        **kwargs,
    ):
        if cache is None:
            if cache_update_index is not None:
                raise ValueError(
                    "`cache_update_index` should not be set if `cache` is "
                    f"`None`. Received: cache={cache}, "
                    f"cache_update_index={cache_update_index}"
                )
            return super().call(
                query,
                value,
                key=key,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                **kwargs,
            )
        key = value if key is None else key
        query = self._query_dense(query)
        key_cache, value_cache = cache[:, 0, ...], cache[:, 1, ...]
        if cache_update_index is None:
            key, value = key_cache, value_cache
        else:
            start = [0, cache_update_index, 0, 0]
            key = keras.ops.slice_update(key_cache, start, self._key_dense(key))
            value = keras.ops.slice_update(value_cache, start, self._value_dense(value))
            cache = keras.ops.stack((key, value), axis=1)
        output, scores = self._compute_attention(
            query=query,
            key=key,
            value=value,
            attention_mask=attention_mask,
            return_attention_scores=return_attention_scores,
            training=training,
        )
        output = self._output_dense(output)
        if return_attention_scores:
            return output, scores, cache
        return output, cache

    def key_value_cache(self, value, key=None):
        """``[B, 2, S, heads, head_dim]``: the key and value projections of
        ``value`` (and ``key``, default ``value``), a cache that cross-attention
        reads with ``cache_update_index=None``."""
        key = value if key is None else key
        return keras.ops.stack((self._key_dense(key), self._value_dense(value)), axis=1)


class CachedMultiHeadAttention(CachedAttention, keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with a key/value cache (`CachedAttention`)."""


class CachedMultiMaxAttention(CachedAttention, MultiMaxAttention):
    """`keras_multimax.layers.MultiMaxAttention` with a key/value cache
    (`CachedAttention`): MultiMax at every cached decoding step."""
