"""Support code for the examples, benchmarks and tests; not part of the library.

The library (``import keras_multimax``) is what a user of the layers imports:
ops, layers, conversion, export, distribution helpers, configuration and the
paper's metrics (`keras_multimax.analysis`). It depends on Keras and NumPy
and imports nothing it does not need.

The toolkit is what the example scripts are built from, and it is kept apart
because it needs heavier packages that the layers never use:

- `keras_multimax.toolkit.data`: the examples' input pipelines, `tf.data`
  with tensorflow-datasets when a dataset is prepared, else real offline data
  (scikit-learn's digits, CPython's documentation text, a date-format task),
  and the character tokenizer `CharVocabulary`;
- `keras_multimax.toolkit.plots`: matplotlib figures of the learned
  modulators, attention maps and the paper's simplex picture;
- `keras_multimax.toolkit.timing`: `StepTimer`, training-step wall times.

``keras_multimax`` does not import this package; import the module you use
(``from keras_multimax.toolkit import data``). Its dependencies come with the
``examples`` extra: ``pip install "keras-multimax[examples]"``
(tensorflow-datasets, matplotlib, scikit-learn).
"""

# No names of its own: each module is imported on purpose, where it is used.
__all__: list[str] = []
