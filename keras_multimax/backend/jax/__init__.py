"""keras_multimax on the JAX backend."""
