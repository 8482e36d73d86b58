"""Input pipelines for the examples: tensorflow-datasets, with real offline defaults.

Part of `keras_multimax.toolkit` (not imported by ``keras_multimax``): it
imports TensorFlow (the pipelines are `tf.data`, which Keras' ``fit`` reads on
every backend) and, when a tfds dataset is asked for, tensorflow-datasets
(``pip install keras-multimax[examples]``).

Each loader returns a `TaskData` (``train`` and ``test`` `tf.data.Dataset`s,
the ``source`` actually used and task metadata). The tensorflow-datasets
(tfds) dataset is used when it can be loaded; by default nothing is
downloaded (``download=False``), so on a machine without a prepared tfds
directory the loader warns once (`OfflineFallbackWarning`) and falls back to
real, offline data:

- images: scikit-learn's bundled handwritten digits (8×8, 1,797 images);
- text: the English documentation topics that ship with CPython
  (`pydoc_data.topics`, about 465,000 characters);
- translation: a generated date-format task, e.g. ``"28 November 2026"`` →
  ``"2026-11-28"``, with many surface forms of the source date.

Text is tokenised per character with `CharVocabulary` (id 0 is padding, 1
start, 2 end: the ids of `keras_multimax.models.TransformerTranslator`; 3
unknown).
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

# The translator's special ids, so that its padding mask and decoding loop
# read what these pipelines write.
from keras_multimax.models.translator import END_ID
from keras_multimax.models.translator import PAD_ID
from keras_multimax.models.translator import START_ID

__all__ = [
    "CharVocabulary",
    "OfflineFallbackWarning",
    "TaskData",
    "char_language_model",
    "date_translation_pairs",
    "image_classification",
    "translation",
]

UNK_ID = max(PAD_ID, START_ID, END_ID) + 1
_FIRST_CHAR_ID = UNK_ID + 1  # Characters take the ids after the special ones.


@dataclasses.dataclass
class TaskData:
    """A task's datasets and what they are.

    Attributes:
        train: Batched training `tf.data.Dataset` of ``(inputs, targets)``.
        test: Batched test `tf.data.Dataset` of ``(inputs, targets)``.
        source: What was loaded, e.g. ``"tfds:mnist"`` or
            ``"offline:sklearn-digits"``.
        info: Task metadata (``num_classes``, ``input_shape``, vocabularies,
            sequence lengths, example counts).
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    source: str
    info: dict[str, Any]


class CharVocabulary:
    """Character-level vocabulary with padding, start, end and unknown ids.

    Example:

    >>> vocab = CharVocabulary.from_texts(["abc", "cab"])
    >>> vocab.size
    7
    >>> ids = vocab.encode("cad", length=6, add_start=True, add_end=True)
    >>> ids.tolist()
    [1, 6, 4, 3, 2, 0]
    >>> vocab.decode(ids)
    'ca?'

    Args:
        chars: The characters, in id order after the four special ids.
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            raise ValueError(
                f"`chars` must not repeat characters. Received: chars={chars!r}"
            )
        self.chars = chars
        self._index = {c: i + _FIRST_CHAR_ID for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocabulary:
        """Builds the vocabulary of every character in `texts`, sorted."""
        seen = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def size(self) -> int:
        """Number of ids, the four special ids included."""
        return len(self.chars) + _FIRST_CHAR_ID

    def encode(
        self,
        text: str,
        length: int | None = None,
        add_start: bool = False,
        add_end: bool = False,
    ) -> np.ndarray:
        """Ids of `text` (unknown characters → 3), truncated/padded to `length`."""
        ids = [self._index.get(c, UNK_ID) for c in text]
        if add_start:
            ids = [START_ID] + ids
        if add_end:
            ids = ids + [END_ID]
        if length is not None:
            ids = ids[:length] + [PAD_ID] * max(0, length - len(ids))
        return np.asarray(ids, dtype="int32")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at the end id; unknown ids give ``"?"``."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            k = i - _FIRST_CHAR_ID
            out.append(self.chars[k] if 0 <= k < len(self.chars) else "?")
        return "".join(out)

    def get_config(self) -> dict[str, Any]:
        return {"chars": self.chars}


class OfflineFallbackWarning(UserWarning):
    """A tfds dataset was not available, so its offline default is used."""


def _unavailable_errors() -> tuple[type[Exception], ...]:
    """What tfds raises when a dataset cannot be had here.

    `DatasetNotFoundError` for an unknown name, an `AssertionError` "could not
    find data" for a dataset that is not prepared (``download=False``), and
    `DownloadError` or an `OSError` (connection errors included) when a
    download fails. Anything else is a bug and propagates.
    """
    import tensorflow_datasets as tfds

    return (
        tfds.core.registered.DatasetNotFoundError,
        tfds.download.DownloadError,
        OSError,
        AssertionError,
    )


# The longest error text quoted in a fallback warning. tfds' "could not find
# data" message (about 200 characters with its directory) fits whole; longer
# texts (e.g. a server's reply in a DownloadError) end at a word boundary.
_MAX_REASON_CHARS = 400


def _reason(error: Exception) -> str:
    """``Type: first line of the message``, shortened at a word boundary only."""
    text = (str(error).splitlines() or [""])[0]
    if len(text) > _MAX_REASON_CHARS:
        # The last space within the limit; a first word longer than the limit
        # is kept whole.
        cut = text.rfind(" ", 0, _MAX_REASON_CHARS + 1)
        text = (text[:cut] if cut > 0 else text.split(" ", 1)[0]) + " [...]"
    return f"{type(error).__name__}: {text}"


def _fall_back(name: str, error: Exception, offline: str) -> None:
    """Warns that `name` is replaced by `offline`; re-raises other assertions."""
    if isinstance(error, AssertionError) and "could not find data" not in str(error):
        raise error
    warnings.warn(
        f"keras_multimax.toolkit.data: tfds dataset '{name}' is not available "
        f"({_reason(error)}); "
        f"using the offline default: {offline}.",
        OfflineFallbackWarning,
        stacklevel=3,
    )


def _tfds_load(name: str, split: str, download: bool, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.load(
        name,
        split=split,
        download=download,
        data_dir=data_dir,
        shuffle_files=False,
    )


def _batch(arrays, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        n = len(arrays[1]) if isinstance(arrays, tuple) else len(arrays)
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _task_data(train, test, batch_size: int, seed: int, source: str, info) -> TaskData:
    """Batches the train (shuffled) and test arrays into a `TaskData`."""
    return TaskData(
        train=_batch(train, batch_size, shuffle=True, seed=seed),
        test=_batch(test, batch_size, shuffle=False, seed=seed),
        source=source,
        info=info,
    )


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

_IMAGE_DATASETS = ("mnist", "cifar10", "digits")


def _digits(seed: int, test_fraction: float = 0.2):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def _tfds_images(name, split, limit, download, data_dir):
    ds = _tfds_load(name, split, download, data_dir)
    if limit is not None:
        ds = ds.take(limit)
    images, labels = [], []
    for example in ds.as_numpy_iterator():
        images.append(example["image"])
        labels.append(example["label"])
    images = np.stack(images).astype("float32") / 255.0
    return images, np.asarray(labels, dtype="int32")


def image_classification(
    name: str = "mnist",
    batch_size: int = 64,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    download: bool = False,
    data_dir: str | None = None,
    seed: int = 0,
) -> TaskData:
    """Image classification data: tfds ``mnist``/``cifar10`` or the offline digits.

    Images are float32 in ``[0, 1]`` with a channel axis, labels int32.
    ``name="digits"`` uses scikit-learn's handwritten digits directly (8×8×1,
    10 classes, 1,797 images split 80/20 with `seed`); it is also the fallback
    when the tfds dataset cannot be loaded, announced by one
    `OfflineFallbackWarning`.

    Example:

    >>> task = image_classification("digits", batch_size=32)
    >>> task.source, task.info["input_shape"], task.info["num_classes"]
    ('offline:sklearn-digits', (8, 8, 1), 10)
    >>> images, labels = next(task.train.as_numpy_iterator())
    >>> images.shape, labels.dtype.name
    ((32, 8, 8, 1), 'int32')

    Args:
        name: ``"mnist"``, ``"cifar10"`` or ``"digits"``.
        batch_size: Batch size of both datasets.
        max_train_examples: Optional cap on training examples (the first
            ones of the tfds split).
        max_test_examples: Optional cap on test examples.
        download: Let tfds download and prepare the dataset if missing.
        data_dir: tfds data directory (tfds' default if None).
        seed: Shuffling seed (and the digits split).

    Returns:
        A `TaskData` with ``info`` keys ``input_shape``, ``num_classes``,
        ``num_train``, ``num_test``.
    """
    if name not in _IMAGE_DATASETS:
        raise ValueError(
            f"`name` must be one of {_IMAGE_DATASETS}. Received: name={name!r}"
        )
    _check_positive("batch_size", batch_size)
    _check_positive("max_train_examples", max_train_examples, allow_none=True)
    _check_positive("max_test_examples", max_test_examples, allow_none=True)
    error = None
    if name != "digits":
        try:
            train = _tfds_images(name, "train", max_train_examples, download, data_dir)
            test = _tfds_images(name, "test", max_test_examples, download, data_dir)
            source = f"tfds:{name}"
        except _unavailable_errors() as e:
            error = e
    if name == "digits" or error is not None:
        if error is not None:
            _fall_back(
                name, error, "scikit-learn handwritten digits (8x8, 1,797 images)"
            )
        train, test = _digits(seed)
        if max_train_examples is not None:
            train = tuple(a[:max_train_examples] for a in train)
        if max_test_examples is not None:
            test = tuple(a[:max_test_examples] for a in test)
        source = "offline:sklearn-digits"
    info = {
        "input_shape": tuple(int(d) for d in train[0].shape[1:]),
        "num_classes": 10,
        "num_train": len(train[1]),
        "num_test": len(test[1]),
    }
    return _task_data(train, test, batch_size, seed, source, info)


# ---------------------------------------------------------------------------
# Character language model
# ---------------------------------------------------------------------------


def _python_docs_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def _windows(ids: np.ndarray, sequence_length: int, limit: int | None):
    n = (len(ids) - 1) // sequence_length
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise ValueError(
            f"The text ({len(ids)} characters) is shorter than one window of "
            f"`sequence_length` + 1. Received: sequence_length={sequence_length}"
        )
    x = ids[: n * sequence_length].reshape(n, sequence_length)
    y = ids[1 : n * sequence_length + 1].reshape(n, sequence_length)
    return x, y


def char_language_model(
    name: str = "tiny_shakespeare",
    sequence_length: int = 64,
    batch_size: int = 32,
    max_train_sequences: int | None = None,
    max_test_sequences: int | None = None,
    download: bool = False,
    data_dir: str | None = None,
    seed: int = 0,
) -> TaskData:
    """Character language-model data: tfds ``tiny_shakespeare`` or Python's docs.

    The text is cut into non-overlapping windows; inputs are ``sequence_length``
    character ids and targets the same window shifted by one character.
    ``name="pydoc"`` uses the English documentation that ships with CPython
    (`pydoc_data.topics`, split 90/10 in order), which is also the fallback
    when the tfds dataset cannot be loaded. The vocabulary is built from the
    training text; unseen test characters map to the unknown id.

    Example:

    >>> task = char_language_model("pydoc", sequence_length=16, batch_size=4)
    >>> x, y = next(task.test.as_numpy_iterator())
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    ((4, 16), True)

    Args:
        name: ``"tiny_shakespeare"`` or ``"pydoc"``.
        sequence_length: Characters per training window.
        batch_size: Batch size.
        max_train_sequences: Optional cap on training windows.
        max_test_sequences: Optional cap on test windows.
        download: Let tfds download and prepare the dataset if missing.
        data_dir: tfds data directory.
        seed: Shuffling seed.

    Returns:
        A `TaskData` with ``info`` keys ``vocabulary`` (a `CharVocabulary`),
        ``vocab_size``, ``sequence_length``, ``num_train``, ``num_test``.
    """
    if name not in ("tiny_shakespeare", "pydoc"):
        raise ValueError(
            f"`name` must be 'tiny_shakespeare' or 'pydoc'. Received: name={name!r}"
        )
    _check_positive("sequence_length", sequence_length)
    _check_positive("batch_size", batch_size)
    error = None
    if name == "tiny_shakespeare":
        try:
            texts = {}
            for split in ("train", "test"):
                ds = _tfds_load(name, split, download, data_dir)
                texts[split] = "".join(
                    ex["text"].decode("utf-8") for ex in ds.as_numpy_iterator()
                )
            train_text, test_text = texts["train"], texts["test"]
            source = "tfds:tiny_shakespeare"
        except _unavailable_errors() as e:
            error = e
    if name == "pydoc" or error is not None:
        if error is not None:
            _fall_back(name, error, "English text of CPython's pydoc_data.topics")
        text = _python_docs_text()
        cut = int(0.9 * len(text))
        train_text, test_text = text[:cut], text[cut:]
        source = "offline:pydoc_data.topics"
    vocab = CharVocabulary.from_texts([train_text])
    train = _windows(vocab.encode(train_text), sequence_length, max_train_sequences)
    test = _windows(vocab.encode(test_text), sequence_length, max_test_sequences)
    info = {
        "vocabulary": vocab,
        "vocab_size": vocab.size,
        "sequence_length": sequence_length,
        "num_train": len(train[0]),
        "num_test": len(test[0]),
    }
    return _task_data(train, test, batch_size, seed, source, info)


# ---------------------------------------------------------------------------
# Translation
# ---------------------------------------------------------------------------

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _ordinal(day: int) -> str:
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}" + {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _date_surface_forms(d: datetime.date) -> list[str]:
    month = _MONTHS[d.month - 1]
    mon = month[:3]
    weekday = d.strftime("%A")
    y, m, day = d.year, d.month, d.day
    return [
        f"{day} {month} {y}",
        f"{month} {day}, {y}",
        f"{day} {mon} {y}",
        f"{mon} {day}, {y}",
        f"{mon}. {day}, {y}",
        f"{weekday}, {day} {month} {y}",
        f"{weekday}, {month} {day}, {y}",
        f"{weekday[:3]} {day} {mon} {y}",
        f"{_ordinal(day)} of {month} {y}",
        f"the {_ordinal(day)} of {month}, {y}",
        f"{month} {_ordinal(day)}, {y}",
        f"{day:02d}.{m:02d}.{y}",
        f"{day}.{m}.{y}",
        f"{y} {month} {day}",
        f"{day} {month.lower()} {y}",
        f"{day} {mon.upper()} {y}",
        f"{month.upper()} {day} {y}",
        f"{day}-{mon}-{y}",
    ]


_FIRST_DATE = datetime.date(1900, 1, 1).toordinal()
_LAST_DATE = datetime.date(2099, 12, 31).toordinal()


def date_translation_pairs(
    num_examples: int,
    seed: int = 0,
    split: str | None = None,
    test_fraction: float = 0.1,
) -> tuple[list[str], list[str]]:
    """Generated (source, target) date pairs, e.g. "28 November 2026" → "2026-11-28".

    Dates are drawn uniformly (with replacement) from 1900-01-01 to
    2099-12-31 and written in one of 18 surface forms (month names,
    abbreviations, ordinals, weekdays, numeric day.month.year, upper/lower
    case); the target is always the ISO date. Numeric forms are day-first
    only, so every source is unambiguous.

    With ``split="train"`` or ``split="test"`` the 73,049 calendar dates are
    first partitioned by a permutation drawn from ``seed``: a fraction
    ``test_fraction`` of them are test dates, the rest training dates, and
    pairs are drawn only from the requested part. With the same ``seed`` the
    two splits therefore share no date in any surface form, so a test pair
    can never be a training pair written differently. ``split=None`` draws
    from all dates.

    Example:

    >>> sources, targets = date_translation_pairs(2, seed=1)
    >>> len(sources), all(len(t) == 10 and t[4] == "-" for t in targets)
    (2, True)
    >>> _, train = date_translation_pairs(500, seed=3, split="train")
    >>> _, test = date_translation_pairs(500, seed=3, split="test")
    >>> set(train) & set(test)
    set()

    Args:
        num_examples: Number of pairs.
        seed: Random seed (of both the partition and the draws).
        split: ``None`` (all dates), ``"train"`` or ``"test"``.
        test_fraction: Fraction of the dates reserved for ``split="test"``,
            in (0, 1).

    Returns:
        Two lists of strings: sources and targets.
    """
    _check_positive("num_examples", num_examples)
    if split not in (None, "train", "test"):
        raise ValueError(
            f"`split` must be None, 'train' or 'test'. Received: split={split!r}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            "`test_fraction` must be in (0, 1). "
            f"Received: test_fraction={test_fraction!r}"
        )
    if split is None:
        rng = np.random.default_rng(seed)
        ordinals = rng.integers(_FIRST_DATE, _LAST_DATE + 1, size=num_examples)
    else:
        all_dates = np.arange(_FIRST_DATE, _LAST_DATE + 1)
        permuted = np.random.default_rng(seed).permutation(all_dates)
        num_test = max(1, int(round(test_fraction * len(all_dates))))
        pool = permuted[:num_test] if split == "test" else permuted[num_test:]
        # An independent stream per split, so that the draws of one split do
        # not depend on the other's size.
        rng = np.random.default_rng([seed, 1 if split == "test" else 2])
        ordinals = pool[rng.integers(len(pool), size=num_examples)]
    sources, targets = [], []
    for ordinal in ordinals:
        d = datetime.date.fromordinal(int(ordinal))
        forms = _date_surface_forms(d)
        sources.append(forms[int(rng.integers(len(forms)))])
        targets.append(d.isoformat())
    return sources, targets


def _encode_pairs(sources, targets, src_vocab, tgt_vocab, src_len, tgt_len):
    src = np.stack([src_vocab.encode(s, src_len) for s in sources])
    full = np.stack(
        [
            # Truncated so that the end id always fits.
            tgt_vocab.encode(
                t[: tgt_len - 1], tgt_len + 1, add_start=True, add_end=True
            )
            for t in targets
        ]
    )
    return (src, full[:, :-1]), full[:, 1:]


def translation(
    name: str = "ted_hrlr_translate/pt_to_en",
    source_length: int = 32,
    target_length: int = 12,
    batch_size: int = 64,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    num_date_examples: tuple[int, int] = (20000, 1000),
    download: bool = False,
    data_dir: str | None = None,
    seed: int = 0,
) -> TaskData:
    """Character-level translation data: tfds ``ted_hrlr_translate`` or dates.

    Elements are ``((source_ids, decoder_input_ids), target_ids)``: the source
    padded/truncated to ``source_length``; the decoder input is the start id
    followed by the target, the target the same shifted left and ended by the
    end id, both ``target_length`` long (padding id 0, to be ignored by the
    loss: ``ignore_class=0``). ``name="dates"`` uses `date_translation_pairs`
    (e.g. "28 November 2026" → "2026-11-28"), also the fallback when the tfds
    dataset cannot be loaded.

    Example:

    >>> task = translation("dates", num_date_examples=(64, 16), batch_size=8)
    >>> (src, dec_in), tgt = next(task.test.as_numpy_iterator())
    >>> src.shape, dec_in.shape, tgt.shape
    ((8, 32), (8, 12), (8, 12))
    >>> task.info["target_vocabulary"].decode(tgt[0])  == task.info["test_targets"][0]
    True

    Args:
        name: A ``ted_hrlr_translate/<pair>`` config (e.g. ``pt_to_en``) or
            ``"dates"``.
        source_length: Source characters kept.
        target_length: Decoder length (target characters + 1).
        batch_size: Batch size.
        max_train_examples: Optional cap on training pairs (tfds).
        max_test_examples: Optional cap on test pairs (tfds).
        num_date_examples: Training and test pairs of the date task.
        download: Let tfds download and prepare the dataset if missing.
        data_dir: tfds data directory.
        seed: Shuffling and generation seed. The date task splits by date:
            ``seed`` reserves 10% of the calendar dates for the test set, and
            training pairs are drawn from the other 90%, so no test date
            occurs in training in any surface form (see
            `date_translation_pairs`).

    Returns:
        A `TaskData` with ``info`` keys ``source_vocabulary``,
        ``target_vocabulary`` (`CharVocabulary`), their ``*_vocab_size``,
        ``source_length``, ``target_length``, ``test_sources``,
        ``test_targets`` (strings, for exact-match evaluation), ``num_train``,
        ``num_test``.
    """
    if name != "dates" and not name.startswith("ted_hrlr_translate"):
        raise ValueError(
            "`name` must be a 'ted_hrlr_translate/<pair>' config or 'dates'. "
            f"Received: name={name!r}"
        )
    _check_positive("source_length", source_length)
    _check_positive("target_length", target_length)
    _check_positive("batch_size", batch_size)
    error = None
    if name != "dates":
        try:
            pair = name.split("/")[-1] if "/" in name else "pt_to_en"
            src_key, tgt_key = pair.split("_to_")
            splits = {}
            for split, limit in (
                ("train", max_train_examples),
                ("test", max_test_examples),
            ):
                ds = _tfds_load(name, split, download, data_dir)
                if limit is not None:
                    ds = ds.take(limit)
                pairs = [
                    (ex[src_key].decode("utf-8"), ex[tgt_key].decode("utf-8"))
                    for ex in ds.as_numpy_iterator()
                ]
                splits[split] = ([p[0] for p in pairs], [p[1] for p in pairs])
            train_pairs, test_pairs = splits["train"], splits["test"]
            source = f"tfds:{name}"
        except _unavailable_errors() as e:
            error = e
    if name == "dates" or error is not None:
        if error is not None:
            _fall_back(
                name,
                error,
                "generated date-format translation ('28 November 2026' -> "
                "'2026-11-28')",
            )
        n_train, n_test = num_date_examples
        train_pairs = date_translation_pairs(n_train, seed=seed, split="train")
        test_pairs = date_translation_pairs(n_test, seed=seed, split="test")
        source = "offline:dates"
    src_vocab = CharVocabulary.from_texts(train_pairs[0])
    tgt_vocab = CharVocabulary.from_texts(train_pairs[1])
    train = _encode_pairs(
        *train_pairs, src_vocab, tgt_vocab, source_length, target_length
    )
    test = _encode_pairs(
        *test_pairs, src_vocab, tgt_vocab, source_length, target_length
    )
    info = {
        "source_vocabulary": src_vocab,
        "target_vocabulary": tgt_vocab,
        "source_vocab_size": src_vocab.size,
        "target_vocab_size": tgt_vocab.size,
        "source_length": source_length,
        "target_length": target_length,
        "test_sources": list(test_pairs[0]),
        "test_targets": [t[: target_length - 1] for t in test_pairs[1]],
        "num_train": len(train[1]),
        "num_test": len(test[1]),
    }
    return _task_data(train, test, batch_size, seed, source, info)
