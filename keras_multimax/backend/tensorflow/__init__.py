"""The TensorFlow implementations of keras_multimax.ops."""
