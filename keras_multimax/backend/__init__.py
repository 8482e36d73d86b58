"""Backend implementations of keras_multimax.ops (one folder per Keras backend)."""
