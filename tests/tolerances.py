"""Tolerances derived from the numbers, not from one machine.

CPUs round differently (AVX2 vs AVX-512 vector widths, FMA, native or emulated
bfloat16 in oneDNN), so a comparison between two computations of the same
quantity is bounded by

    depth · eps(dtype) · scale,     scale = max(max|expected|, floor)

where ``eps`` is the dtype's machine epsilon (the gap between 1 and the next
float), ``scale`` the magnitude of the compared quantity, and ``depth`` how
many roundings the two computations can differ by, in sequence, each of up
to one ``eps`` of the scale. Every call site states its depth and why.

``norm="rms"`` compares root-mean-squares instead of maxima (difference and
scale alike): rounding errors spread over every entry while real defects
move whole outputs, so on low-precision dtypes (bfloat16 has 8 bits) the RMS
separates the two where the maximum cannot.
"""

from __future__ import annotations

import numpy as np

# Machine epsilon: 2**-(mantissa bits).
EPS = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}


def _size(values, norm: str) -> float:
    values = np.abs(np.asarray(values, dtype=np.float64))
    if not values.size:
        return 0.0
    if norm == "max":
        return float(np.max(values))
    if norm == "rms":
        return float(np.sqrt(np.mean(values**2)))
    raise ValueError(f"norm must be 'max' or 'rms'. Received: norm={norm!r}")


def bound(expected, dtype: str, depth: float, floor=0.0, norm="max") -> float:
    """``depth · eps(dtype) · max(|expected|, floor)``, ``|·|`` the norm."""
    return depth * EPS[dtype] * max(_size(expected, norm), floor)


def assert_close(
    actual, expected, dtype: str, depth: float, floor=0.0, norm="max", what=""
):
    """``|actual − expected| <= bound(expected, ...)``; returns the ratio in eps · scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    unit = bound(expected, dtype, 1.0, floor, norm)
    error = _size(actual - expected, norm)
    assert error <= depth * unit, (
        f"{what}: {norm} |difference| {error:.3g} = {error / unit:.3g} eps · scale, "
        f"above the bound of {depth} eps · scale ({dtype}, {norm} scale "
        f"{unit / EPS[dtype]:.3g})"
    )
    return error / unit if unit else 0.0


def assert_defect_caught(
    defective, expected, dtype: str, depth: float, floor=0.0, norm="max"
):
    """A real defect must exceed the bound of a check at least 10 times.

    Controls for loosened bounds: if a bound were so loose that a real bug
    (ts ignored, a mask applied before the modulation, parameters of the
    wrong head, stale weights) fit inside it, the check would mean nothing.
    """
    limit = bound(expected, dtype, depth, floor, norm)
    error = _size(np.asarray(defective, np.float64) - expected, norm)
    assert error >= 10 * limit, (
        f"a real defect moves the output by only {error:.3g}, less than 10× "
        f"the bound {limit:.3g}: the check could not tell it from rounding"
    )
    return error / limit
