"""Blockwise MultiMax attention on JAX: `jax.custom_vjp`, `jax.lax` loops.

The algorithm is `keras_multimax._blockwise` (in `keras.ops`, which on this
backend are `jax.numpy` calls); this module adds its loops
(`jax.lax.fori_loop`, `jax.lax.scan`: sequential by construction) and the
custom VJP, whose residuals are the inputs, the output and the per-row
log-sum-exp. Arguments arrive validated by `keras_multimax._attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from keras_multimax import _blockwise


class _Primitives:
    """`_blockwise.Primitives`: `jax.lax.fori_loop`, `jax.lax.scan`, `jax.lax.reduce`."""

    @staticmethod
    def fold(start, stop, body, carry):
        return jax.lax.fori_loop(start, stop, body, carry)

    @staticmethod
    def map_blocks(count, body, carry, like):
        del like  # `scan` reads the dtypes and shapes from the body
        return jax.lax.scan(lambda c, i: body(i, c), carry, jnp.arange(count))

    @staticmethod
    def sum_products(products, axis):
        # One variadic reduction: XLA's CPU backend hands separate reductions
        # to a library kernel, each after writing its product to memory
        # (the backward measured 2x slower that way).
        zeros = tuple(jnp.zeros((), p.dtype) for p in products)
        sums = jax.lax.reduce(
            tuple(products),
            zeros,
            lambda a, b: tuple(u + v for u, v in zip(a, b)),
            (axis,),
        )
        return jnp.stack(sums)


_PRIMITIVES = _Primitives()


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, bias, mask, ranges, ts, tiling):
    return _blockwise.forward(q, k, v, bias, mask, ranges, ts, tiling, _PRIMITIVES)[0]


def _attention_fwd(q, k, v, bias, mask, ranges, ts, tiling):
    out, lse = _blockwise.forward(q, k, v, bias, mask, ranges, ts, tiling, _PRIMITIVES)
    return out, (q, k, v, bias, mask, ranges, ts, out, lse)


def _attention_bwd(tiling, saved, d_out):
    q, k, v, bias, mask, ranges, ts, out, lse = saved
    d_q, d_k, d_v, d_bias, d_ranges, d_ts = _blockwise.backward(
        q, k, v, bias, mask, ranges, ts, out, lse, d_out, tiling, _PRIMITIVES
    )
    return d_q, d_k, d_v, d_bias, None, d_ranges, d_ts


_attention.defvjp(_attention_fwd, _attention_bwd)


def multimax_dot_product_attention(query, key, value, bias, mask, ranges, ts, tiling):
    """Blockwise MultiMax attention of validated arrays (see `_attention`)."""
    return _attention(query, key, value, bias, mask, ranges, ts, tiling)
