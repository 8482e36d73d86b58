"""What the operations need to take symbolic inputs, as `keras.ops` do.

`keras.ops` functions check `any_symbolic_tensors` and then return
``Operation(...).symbolic_call(...)``; the helpers here do the same with
public Keras API only.
"""

from __future__ import annotations

import keras
import numpy as np


def is_symbolic(*values) -> bool:
    """Whether any of ``values`` (nested structures allowed) is a `keras.KerasTensor`."""
    return any(isinstance(v, keras.KerasTensor) for v in keras.tree.flatten(values))


def spec(value, name: str):
    """Something with the ``shape`` and ``dtype`` of ``value``, for checks.

    KerasTensors, tensors, variables and arrays are returned as they are;
    Python scalars and lists become NumPy arrays (the dtype their values
    have, which is all the checks read).
    """
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise TypeError(
            f"`{name}` could not be converted to a tensor ({error}). "
            f"Received: {name}={value!r}"
        ) from None


def broadcast_shapes(*shapes) -> tuple:
    """NumPy broadcasting of static shapes, None for a dimension not yet known.

    A known dimension other than 1 wins over None; the caller has checked
    that the shapes broadcast.

    >>> broadcast_shapes((None, 1, 5, 5), (4, 1, 1))
    (None, 4, 5, 5)
    """
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        known = [d for d in dims if d is not None and d != 1]
        if known:
            out.append(known[0])
        elif None in dims:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)
