"""Tests of keras_multimax.toolkit.data: tfds pipelines under mock data, offline defaults.

The pipelines are `tf.data` on every Keras backend: their elements are
TensorFlow tensors, read here as NumPy arrays.
"""

import datetime
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_multimax.toolkit import data


def _first(ds):
    return next(ds.as_numpy_iterator())


# ---------------------------------------------------------------------------
# tfds pipelines (tfds.testing.mock_data: no download, random examples)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_image_pipeline_with_tfds(name, shape, capsys):
    with tfds.testing.mock_data(num_examples=20):
        task = data.image_classification(
            name, batch_size=8, max_train_examples=16, max_test_examples=8
        )
    assert task.source == f"tfds:{name}"
    assert "offline" not in capsys.readouterr().out  # and no warning (filterwarnings)
    assert task.info == {
        "input_shape": shape,
        "num_classes": 10,
        "num_train": 16,
        "num_test": 8,
    }
    images, labels = _first(task.train)
    assert images.shape == (8, *shape) and images.dtype == "float32"
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.dtype == "int32"
    assert set(labels) <= set(range(10))
    assert sum(len(b[1]) for b in task.train.as_numpy_iterator()) == 16


def test_char_lm_pipeline_with_tfds():
    with tfds.testing.mock_data(num_examples=2):
        task = data.char_language_model(
            "tiny_shakespeare", sequence_length=4, batch_size=2
        )
    assert task.source == "tfds:tiny_shakespeare"
    vocab = task.info["vocabulary"]
    x, y = _first(task.test)
    assert x.shape == (2, 4) and y.shape == (2, 4)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # Windows are consecutive slices of the text: decoding them gives text.
    assert all(len(vocab.decode(row)) == 4 for row in x)
    assert task.info["vocab_size"] == vocab.size > 4


def test_translation_pipeline_with_tfds():
    with tfds.testing.mock_data(num_examples=6):
        task = data.translation(
            "ted_hrlr_translate/pt_to_en",
            source_length=10,
            target_length=8,
            batch_size=3,
        )
    assert task.source == "tfds:ted_hrlr_translate/pt_to_en"
    (src, dec_in), tgt = _first(task.test)
    assert src.shape == (3, 10) and dec_in.shape == (3, 8) and tgt.shape == (3, 8)
    np.testing.assert_array_equal(dec_in[:, 0], data.START_ID)
    np.testing.assert_array_equal(dec_in[:, 1:], tgt[:, :-1])
    vocab = task.info["target_vocabulary"]
    for row, text in zip(tgt, task.info["test_targets"]):
        assert vocab.decode(row) == text[:7]
    assert len(task.info["test_sources"]) == task.info["num_test"] == 6


# ---------------------------------------------------------------------------
# Offline defaults
# ---------------------------------------------------------------------------


def test_fallback_warns_once_prints_nothing_and_uses_digits(tmp_path, capsys):
    with pytest.warns(data.OfflineFallbackWarning) as caught:
        task = data.image_classification("mnist", data_dir=str(tmp_path))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "tfds dataset 'mnist' is not available" in message
    assert "offline default: scikit-learn handwritten digits" in message
    assert caught[0].filename == __file__  # points at the caller
    assert capsys.readouterr().out == ""
    assert task.source == "offline:sklearn-digits"
    # tfds' reason is quoted whole (it was cut mid-word at 120 characters).
    with pytest.raises(AssertionError) as error:
        data._tfds_load("mnist", "train", download=False, data_dir=str(tmp_path))
    assert str(error.value).splitlines()[0] in message


def test_fallback_warning_shortens_a_long_reason_at_a_word_boundary(monkeypatch):
    words = [f"word{i}" for i in range(200)]  # one line of 1,389 characters

    def unavailable(*args, **kwargs):
        raise OSError(" ".join(words) + "\nsecond line")

    monkeypatch.setattr(data, "_tfds_load", unavailable)
    with pytest.warns(data.OfflineFallbackWarning) as caught:
        data.image_classification("mnist")
    reason = re.search(r"\(OSError: (.*)\); using", str(caught[0].message)).group(1)
    assert reason.endswith(" [...]"), reason
    quoted = reason.removesuffix(" [...]").split(" ")
    # Whole words, as many as fit in the limit.
    assert quoted == words[: len(quoted)]
    assert len(" ".join(quoted)) <= data._MAX_REASON_CHARS
    assert len(" ".join(words[: len(quoted) + 1])) > data._MAX_REASON_CHARS


@pytest.mark.parametrize("access", ["import", "attribute"])
def test_old_module_warns_and_reexports_the_toolkit(access, monkeypatch):
    import keras_multimax

    # As in a fresh process (hasattr would import it, through the package's
    # __getattr__).
    if "data" in vars(keras_multimax):
        monkeypatch.delattr(keras_multimax, "data")
    monkeypatch.delitem(sys.modules, "keras_multimax.data", raising=False)
    with pytest.warns(DeprecationWarning, match="removed in 0.4.0") as caught:
        if access == "import":
            from keras_multimax import data as old
        else:
            old = keras_multimax.data
    (warning,) = [w for w in caught if w.category is DeprecationWarning]
    assert "`keras_multimax.toolkit.data`" in str(warning.message)
    assert old is sys.modules["keras_multimax.data"]
    for name in [*data.__all__, "PAD_ID", "START_ID", "END_ID", "UNK_ID"]:
        assert getattr(old, name) is getattr(data, name), name


@pytest.mark.parametrize(
    "task", [data.image_classification, data.char_language_model, data.translation]
)
def test_bugs_inside_tfds_loading_are_not_hidden_by_the_fallback(task, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a missing dataset")

    monkeypatch.setattr(data, "_tfds_load", broken)
    monkeypatch.setattr(data, "_tfds_images", broken, raising=False)
    with pytest.raises(KeyError, match="a bug"):
        task()


def test_digits_are_the_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    task = data.image_classification("digits", batch_size=2000, seed=3)
    assert (task.info["num_train"], task.info["num_test"]) == (1438, 359)
    train_x, train_y = _first(task.train)
    test_x, test_y = _first(task.test)
    images = np.concatenate([train_x, test_x])[..., 0]
    labels = np.concatenate([train_y, test_y])
    # Same images (scaled to [0, 1]) and labels, as a set, none repeated.
    key = lambda im, lab: (int(lab), tuple(np.round(im.ravel() * 16).astype(int)))  # noqa: E731
    ours = sorted(key(i, lab) for i, lab in zip(images, labels))
    theirs = sorted(key(i / 16, lab) for i, lab in zip(digits.images, digits.target))
    assert ours == theirs
    assert images.min() == 0.0 and images.max() == 1.0


def test_pydoc_text_windows(tmp_path):
    from pydoc_data import topics

    with pytest.warns(data.OfflineFallbackWarning, match="pydoc_data.topics"):
        task = data.char_language_model(
            "tiny_shakespeare", sequence_length=32, batch_size=4, data_dir=str(tmp_path)
        )
    assert task.source == "offline:pydoc_data.topics"
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    vocab = task.info["vocabulary"]
    x, _ = _first(
        data.char_language_model("pydoc", sequence_length=32)
        .train.unbatch()
        .batch(10**6)
    )
    # Every window is a slice of the text (shuffled order).
    windows = [vocab.decode(row) for row in x[:20]]
    assert all(w in text for w in windows)
    assert task.info["num_train"] == (int(0.9 * len(text)) - 1) // 32


def test_date_translation_pairs_are_correct_dates():
    sources, targets = data.date_translation_pairs(3000, seed=0)
    months = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
    forms = set()
    for source, target in zip(sources, targets):
        d = datetime.date.fromisoformat(target)
        assert 1900 <= d.year <= 2099
        assert str(d.year) in source
        low = source.lower()
        assert (
            months[d.month - 1][:3].lower() in low
            or re.search(rf"\b0?{d.month}\.{d.year}\b", source) is not None
        ), source
        assert re.search(rf"(?<!\d)0?{d.day}(?!\d)", source.replace(str(d.year), "")), (
            source
        )
        for weekday in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                        "Saturday", "Sunday"):  # fmt: skip
            if weekday[:3] in source:
                assert d.strftime("%A").startswith(weekday[:3]), source
        forms.add(re.sub(r"[0-9]+", "9", re.sub(r"[A-Za-z]+", "A", source)))
    assert len(set(sources)) > 2900
    assert len(forms) >= 8  # many surface forms


def test_date_translation_task(capsys):
    task = data.translation("dates", num_date_examples=(200, 50), batch_size=50)
    assert capsys.readouterr().out == ""  # asked for directly: no fallback line
    assert task.source == "offline:dates"
    (src, dec_in), tgt = _first(task.test)
    src_vocab = task.info["source_vocabulary"]
    tgt_vocab = task.info["target_vocabulary"]
    assert [src_vocab.decode(s) for s in src] == task.info["test_sources"]
    assert [tgt_vocab.decode(t) for t in tgt] == task.info["test_targets"]
    # Targets: 10 characters, then the end id.
    np.testing.assert_array_equal(tgt[:, 10], data.END_ID)
    assert set(tgt_vocab.chars) <= set("0123456789-")


@pytest.mark.parametrize("seed", [0, 1])
def test_date_translation_test_dates_never_occur_in_training(seed):
    # Sizes of examples/reproduce.py: drawn independently, about a quarter of
    # the 500 test dates would also be training dates.
    task = data.translation(
        "dates", num_date_examples=(6000, 500), batch_size=500, seed=seed
    )
    tgt_vocab = task.info["target_vocabulary"]
    train_dates = {
        tgt_vocab.decode(row)
        for _, tgt in task.train.as_numpy_iterator()
        for row in tgt
    }
    test_dates = {
        tgt_vocab.decode(row) for _, tgt in task.test.as_numpy_iterator() for row in tgt
    }
    assert len(train_dates) > 5000 and len(test_dates) > 450
    assert test_dates == set(task.info["test_targets"])
    assert all(len(d) == 10 for d in train_dates | test_dates)
    assert train_dates.isdisjoint(test_dates), sorted(train_dates & test_dates)[:5]


def test_date_translation_pairs_splits_partition_the_calendar():
    num_days = (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days + 1
    _, test = data.date_translation_pairs(40000, seed=5, split="test")
    _, train = data.date_translation_pairs(40000, seed=5, split="train")
    # 40,000 draws from the 7,305 test dates reach nearly all of them.
    assert 7200 < len(set(test)) <= round(0.1 * num_days)
    assert set(train).isdisjoint(test)
    # Another seed reserves other dates.
    _, other = data.date_translation_pairs(40000, seed=6, split="test")
    assert 0 < len(set(other) & set(test)) < 0.2 * len(set(test))


def test_char_vocabulary():
    vocab = data.CharVocabulary.from_texts(["hello", "world"])
    assert vocab.chars == sorted(set("helloworld"))
    ids = vocab.encode("low!", length=7, add_start=True, add_end=True)
    assert ids.tolist()[:1] == [data.START_ID] and ids.tolist()[-1:] == [0]
    assert ids[4] == data.UNK_ID and ids[5] == data.END_ID
    assert vocab.decode(ids) == "low?"
    with pytest.raises(ValueError, match="repeat"):
        data.CharVocabulary(["a", "a"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.image_classification("imagenet"), "name='imagenet'"),
        (lambda: data.image_classification("digits", batch_size=0), "batch_size=0"),
        (lambda: data.char_language_model("wiki"), "name='wiki'"),
        (
            lambda: data.char_language_model("pydoc", sequence_length=-1),
            "sequence_length=-1",
        ),
        (lambda: data.translation("wmt14"), "name='wmt14'"),
        (lambda: data.date_translation_pairs(0), "num_examples=0"),
        (lambda: data.date_translation_pairs(2, split="val"), "split='val'"),
        (
            lambda: data.date_translation_pairs(2, split="test", test_fraction=1.0),
            "test_fraction=1.0",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
