"""Tests of keras_multimax.toolkit's plots and step timer, and of their old names.

Written once with `keras.ops`; they run on every backend (the plots take
tensors of any backend). `toolkit.data` has its own file, tests/test_data.py.
"""

import ast
import os
import pathlib

import keras
import numpy as np
import numpy_reference as ref
import pytest
from tolerances import assert_close

import keras_multimax
from keras_multimax import Modulator
from keras_multimax import analysis
from keras_multimax import layers
from keras_multimax.toolkit import plots
from keras_multimax.toolkit import timing


def test_the_library_imports_none_of_the_toolkit():
    """No library module imports the toolkit or tensorflow-datasets, even lazily.

    Exempt: the toolkit itself and ``keras_multimax/data.py``, the deprecated
    alias of ``toolkit.data``, which ``keras_multimax`` does not import.
    """
    package = pathlib.Path(keras_multimax.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("toolkit/") or relative == "data.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [
                    f"{node.module}.{alias.name}" for alias in node.names
                ]
            else:
                continue
            offenders += [
                f"{relative}:{node.lineno} imports {name}"
                for name in names
                if name.startswith(
                    (
                        "keras_multimax.toolkit",
                        "keras_multimax.data",
                        "tensorflow_datasets",
                    )
                )
            ]
    assert not offenders, offenders


# ---------------------------------------------------------------------------
# StepTimer
# ---------------------------------------------------------------------------


def test_step_timer_counts_steps():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    timer = timing.StepTimer(warmup=2)
    model.fit(np.ones((12, 3)), np.ones(12), batch_size=3, epochs=2, verbose=0,
              callbacks=[timer])  # fmt: skip
    assert len(timer.step_times) == 8
    assert timer.median() == pytest.approx(np.median(timer.step_times[2:]))


@pytest.mark.parametrize("warmup", [-1, 1.5, True])
def test_step_timer_bad_warmup(warmup):
    with pytest.raises(ValueError, match=f"Received: warmup={warmup!r}"):
        timing.StepTimer(warmup=warmup)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib")
    import matplotlib.image

    attention = layers.MultiMaxAttention(2, 3, per_head=True, name="attn")
    attention.build((1, 4, 6), (1, 4, 6))  # per-head parameters: a curve per head
    # (heads, queries, keys) probabilities, a tensor of the backend.
    scores = np.random.default_rng(0).normal(size=(2, 4, 4))
    probs = keras.ops.convert_to_tensor(ref.softmax(scores), "float32")
    paths = [os.path.join(tmp_path, f"{n}.png") for n in ("mod", "att", "simplex")]
    plots.plot_modulators(attention, paths[0])
    plots.plot_attention_maps({"SoftMax": probs, "MultiMax": probs[0]}, paths[1])
    plots.plot_simplex(path=paths[2])
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_modulators_draws_each_layers_sigma():
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib")
    import matplotlib.pyplot as plt

    head = layers.SegLU(modulator=Modulator(order=2), name="head")
    model = keras.Sequential([keras.Input((4,)), head], name="net")
    ranges = np.array([-1.0, 1.0, -2.0, 2.0], "float32")
    ts = np.array([0.5, -0.25, 0.1, -0.05], "float32")
    head.set_weights([ranges, ts])
    fig = plots.plot_modulators(model, x_range=(-4.0, 4.0))
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label() == "σ(x)"]
    x = np.asarray(line.get_xdata(), dtype="float64")
    # σ in float32 (about 8 roundings: two terms per order, a square) against
    # the float64 reference, on values up to |σ(±4)| ≈ 8.
    assert_close(line.get_ydata(), ref.seglu(x, ranges, ts), "float32", depth=16)
    plt.close(fig)


def test_plot_simplex_draws_multimax_of_the_given_modulator():
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib")
    import matplotlib.pyplot as plt

    ranges = keras.ops.convert_to_tensor([0.0, 0.5, 0.0, 0.5])
    ts = keras.ops.convert_to_tensor([-1.0, -0.5, 0.2, 0.0])
    fig = plots.plot_simplex(ranges, ts)
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label() == "MultiMax"]
    u = np.linspace(-1.0, 1.0, 41)
    v = np.stack([np.ones_like(u), u, -np.ones_like(u)], axis=-1)
    p = ref.multimax(
        v, keras.ops.convert_to_numpy(ranges), keras.ops.convert_to_numpy(ts)
    )
    # Barycentric coordinates with corners (0, 0), (1, 0), (1/2, √3/2) of
    # float32 probabilities (σ, exp, sum of 3, divide: about 16 roundings of
    # at most 1) against the float64 reference.
    assert_close(line.get_xdata(), p[:, 1] + 0.5 * p[:, 2], "float32", depth=16)
    assert_close(line.get_ydata(), np.sqrt(3) / 2 * p[:, 2], "float32", depth=16)
    plt.close(fig)


def test_plot_errors():
    pytest.importorskip("matplotlib", reason="plots need the optional matplotlib")
    with pytest.raises(ValueError, match="no layer with `ranges`"):
        plots.plot_modulators(keras.Sequential([keras.Input((2,))], name="plain"))
    with pytest.raises(ValueError, match="both `ranges` and `ts`.*ts=None"):
        plots.plot_simplex(ranges=np.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        plots.plot_attention_maps({"x": np.zeros(2)})
    with pytest.raises(ValueError, match=r"Received: maps=\{\}"):
        plots.plot_attention_maps({})


def test_plotting_leaves_the_users_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="plots need matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # as a user (or a notebook) might have chosen
    try:
        plots.plot_simplex(path=os.path.join(tmp_path, "simplex.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


# ---------------------------------------------------------------------------
# The names that moved out of keras_multimax.analysis in 0.3.0
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, module",
    [
        ("StepTimer", timing),
        ("plot_modulators", plots),
        ("plot_attention_maps", plots),
        ("plot_simplex", plots),
    ],
)
def test_old_analysis_names_warn_and_return_the_moved_objects(name, module):
    new_home = f"{module.__name__}.{name}"
    with pytest.warns(DeprecationWarning, match="removed in 0.4.0") as caught:
        old = getattr(analysis, name)
    assert old is getattr(module, name)
    (warning,) = caught
    assert f"`{new_home}`" in str(warning.message)
    assert warning.filename == __file__  # points at the caller
    assert name not in analysis.__all__


def test_unknown_analysis_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'plot_everything'"):
        analysis.plot_everything  # noqa: B018
