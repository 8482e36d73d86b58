"""The JAX implementations of keras_multimax.ops."""
