import json

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from tests.tuning.learning_data import LEARNING, write_colour_classes
from transferkit.cli import app, needs_tensorflow
from transferkit.data.batches import ImageBatches
from transferkit.errors import RecipeError, RunError
from transferkit.outputs import encode_targets
from transferkit.recipe import load_recipe
from transferkit.tuning.lr_find import RangeTest, StageSetup, plot_range_test, range_test, suggest


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory):
    return write_colour_classes(tmp_path_factory.mktemp("colours") / "data")


def test_suggestion_lies_in_the_tested_and_usable_range_and_the_plot_is_written(colour_dir, tmp_path):
    result = transferkit.find_learning_rate(colour_dir, None, LEARNING, output=tmp_path / "new" / "lr.png")
    rates = result.learning_rates
    assert result.min_lr == rates[0] < rates[-1] <= result.max_lr
    assert np.all(np.diff(rates) > 0) and len(rates) == len(result.losses) == len(result.smoothed)
    assert result.steps == 50  # 6 batches: 8 passes would be 48, the floor is 50
    low, high = result.usable
    assert rates[0] <= low * 10 <= result.suggestion <= high <= rates[-1]
    assert result.override() == f"stages.0.learning_rate={result.suggestion:.2g}"
    assert (tmp_path / "new" / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # its folder made
    # A plot that cannot be written is one line naming it, not a traceback after the test.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RunError, match=r"cannot write the plot .*a-file/lr.png: .*choose another -o"):
        plot_range_test(result, tmp_path / "a-file" / "lr.png")
    # The recipe's own head rate is one the test finds usable on this easy task.
    assert low <= load_recipe().stages[0].learning_rate <= high


def _linear_setup(scale: float) -> StageSetup:
    """A logistic regression on 8 features whose labels follow two of them, inputs times ``scale``,
    trained with SGD."""
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (128, 8)).astype("float32")
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    batches = ImageBatches(features * scale, encode_targets(labels, 2), 16, shuffle=True, seed=0)
    setup = StageSetup(recipe=load_recipe(None, {"weights": "none", "stages.0.optimizer": "sgd"}), stage_index=0,
                       classifier=model, model=model, train=batches, val=batches, n_classes=2,
                       class_names=["a", "b"], train_images=features, cached=True)
    setup.initial_weights = model.get_weights()
    return setup


def test_suggestion_moves_down_when_the_input_scale_grows():
    # With SGD the largest stable rate falls with the square of the input scale (the loss's
    # curvature grows with it): 100x the scale moves the suggestion down by far more than 20x.
    plain, scaled = range_test(_linear_setup(1.0)), range_test(_linear_setup(100.0))
    assert plain.suggestion is not None and scaled.suggestion is not None
    assert scaled.suggestion < plain.suggestion / 20
    assert scaled.diverged  # the larger scale makes the loss blow up within the range


def test_range_test_puts_the_weights_back():
    setup = _linear_setup(10.0)
    before = [np.array(weight) for weight in setup.model.get_weights()]
    range_test(setup, steps=20)
    for old, new in zip(before, setup.model.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_suggest_reads_midway_between_the_fall_and_a_tenth_of_the_minimum_and_none_from_a_flat_curve():
    rates = np.logspace(-6, 0, 61)
    loss = 1.0 - 0.5 * np.exp(-((np.log10(rates) + 2) ** 2))  # falls from 1 to 0.5 at 1e-2, rises after
    suggestion, (low, high) = suggest(rates, loss)
    assert high == pytest.approx(1e-2)
    fall = rates[np.argmax(loss <= 1.0 - 0.1 * 0.5)]  # where it has fallen 10% of its way down
    assert low == pytest.approx(fall / 10)
    assert suggestion == pytest.approx(np.sqrt(fall * high / 10))
    assert fall < suggestion < high
    assert suggest(rates, np.full_like(rates, 0.7)) == (None, None)


def test_a_loss_lowest_at_the_start_of_the_range_gives_no_suggestion_but_a_lower_min_lr():
    """Every rate tried too high: before, the usable range reached below --min-lr and the
    suggestion was its first rate."""
    rates = np.logspace(-7, 1, 60)
    loss = 0.5 + 0.4 * np.linspace(0, 1, 60) ** 2  # rising from its second step on
    loss[0] = 0.9
    assert suggest(rates, loss) == (None, None)
    result = RangeTest(rates, loss, loss, 1e-7, 10.0, 60, stage_index=0, stage_name="head")
    assert result.lowest_at_start and result.to_dict()["lowest_at_start"] is True
    assert result.describe().splitlines()[1] == ("the loss was lowest at the start of the range, 1e-07: every rate "
                                                 "tried was too high; run the test again with a lower --min-lr")
    # A level loss (no learning at all: a frozen head, labels that do not follow the images) is not
    # "too high", whatever its noise; nor a loss that dips within the start and falls later.
    rng = np.random.default_rng(0)
    level = 0.7 + rng.normal(0, 0.002, 60)
    flat = RangeTest(rates, level, level, 1e-7, 10.0, 60, stage_index=0, stage_name="head")
    assert suggest(rates, level) == (None, None) and not flat.lowest_at_start
    assert flat.describe().splitlines()[1].startswith("no rate made the loss fall: run transferkit doctor")
    dipping = np.concatenate([[0.9, 0.5, 0.9, 0.9, 0.9, 0.9], np.linspace(0.9, 0.3, 40), np.linspace(0.3, 2.0, 14)])
    suggestion, (low, high) = suggest(rates, dipping)
    assert high == pytest.approx(rates[45]) and suggestion is not None
    # Diverged in its first steps (--min-lr too high already): too high, not "no learning".
    diverged = RangeTest(rates[:2], np.array([1.2, 31.7]), np.array([1.2, 31.7]), 1.0, 10.0, 50, stage_index=0)
    assert diverged.diverged and diverged.lowest_at_start
    # Learning shown at the 7th rate, less than 10x the first: the usable range does not reach below it.
    falling = np.concatenate([np.full(6, 1.0), np.linspace(0.3, 0.2, 44), np.linspace(0.2, 1.5, 10)])
    suggestion, (low, high) = suggest(rates, falling)
    assert low == rates[0] and suggestion >= rates[0]


def test_a_stage_the_recipe_lacks_is_a_recipe_error(colour_dir):
    with pytest.raises(RecipeError, match="has 2 stage"):
        transferkit.find_learning_rate(colour_dir, None, LEARNING, stage=2)


def test_lr_find_command_prints_the_set_to_use_and_writes_the_plot(colour_dir, tmp_path):
    output = tmp_path / "plot.png"
    flags = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
             "--set", "head.units=[16]", "--set", "precision=\"float32\""]
    result = CliRunner().invoke(app, ["lr-find", str(colour_dir), *flags, "-o", str(output), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "use it with: --set stages.0.learning_rate=" in result.output
    # The stage as --stage and stages.N count it (it said "stage 1 'head'" above "stages.0").
    assert result.output.startswith("learning-rate range test of stage 'head' (--stage 0): "), result.output
    assert f"wrote {output}" in result.output and output.is_file()
    before = output.read_bytes()
    again = CliRunner().invoke(app, ["lr-find", str(colour_dir), *flags, "-o", str(output), "--steps", "20"])
    assert again.exit_code == 1 and "exists already; pass --force" in again.output and output.read_bytes() == before
    data = json.loads(CliRunner().invoke(app, ["lr-find", str(colour_dir), *flags, "-o", str(output), "--json",
                                               "--steps", "20", "--force"]).output)
    assert data["steps"] == 20 and data["suggestion"] is not None


def test_lr_find_and_doctor_model_load_tensorflow_first():
    assert needs_tensorflow(["transferkit", "lr-find", "images"])
    assert needs_tensorflow(["transferkit", "doctor", "images", "--model"])
    assert not needs_tensorflow(["transferkit", "doctor", "images"])
    assert not needs_tensorflow(["transferkit", "lr-find", "--help"])
