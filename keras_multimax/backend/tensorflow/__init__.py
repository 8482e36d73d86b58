"""keras_multimax on the TensorFlow backend."""
