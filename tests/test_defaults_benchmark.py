"""benchmarks/defaults.py: its datasets (generated textures, scikit-image's faces), the held-out
test split, the verdicts it draws from paired runs, and one small real run end to end."""

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from transferkit.data.synthetic import TEXTURES, draw_texture, write_textures_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def defaults():
    return runpy.run_path(str(BENCHMARKS / "defaults.py"), run_name="defaults_benchmark")


def _spectrum(image) -> np.ndarray:
    """Colour-blind pattern figures: the grey image's power by frequency band and by direction
    (sorted, so that orientation does not count), and how peaked it is."""
    grey = np.asarray(image.convert("L"), dtype="float64")
    grey = (grey - grey.mean()) / (grey.std() + 1e-9)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    n = grey.shape[0]
    y, x = np.mgrid[:n, :n] - n // 2
    radius, angle = np.hypot(x, y), np.arctan2(y, x) % np.pi
    bands = np.array([power[(radius >= i) & (radius < i + 2)].sum() for i in range(0, n // 2, 2)])
    directions = np.sort([power[(angle >= k * np.pi / 8) & (angle < (k + 1) * np.pi / 8) & (radius > 2)].sum()
                          for k in range(8)])
    top = np.sort(power.ravel())[::-1]
    return np.concatenate([bands / bands.sum(), directions / directions.sum(),
                           [top[:4].sum() / power.sum(), top[:16].sum() / power.sum()]])


def test_textures_differ_by_pattern_not_colour():
    rng = np.random.default_rng(0)
    images = [(index, draw_texture(kind, 64, rng)) for index, kind in enumerate(TEXTURES) for _ in range(30)]
    labels = [index for index, _ in images]
    pattern = np.array([_spectrum(image) for _, image in images])
    pixels = [np.asarray(image, "float64") for _, image in images]
    colour = np.array([np.concatenate([p.mean((0, 1)), p.std((0, 1))]) for p in pixels])
    chance = 1 / len(TEXTURES)
    by_pattern = cross_val_score(LogisticRegression(C=10, max_iter=5000), pattern, labels, cv=3).mean()
    by_colour = cross_val_score(LogisticRegression(max_iter=5000), colour, labels, cv=3).mean()
    assert by_pattern > 0.6 > chance + 0.2 > by_colour


def test_textures_are_written_per_class_and_the_seed_repeats_them(tmp_path):
    first = write_textures_dataset(tmp_path / "a", classes=3, per_class=4, size=32, seed=5)
    again = write_textures_dataset(tmp_path / "b", classes=3, per_class=4, size=32, seed=5)
    assert sorted(p.name for p in first.iterdir()) == sorted(TEXTURES[:3])
    files = sorted(first.rglob("*.png"))
    assert len(files) == 12
    assert all(f.read_bytes() == (again / f.relative_to(first)).read_bytes() for f in files)
    with pytest.raises(ValueError, match="unknown texture 'plaid'"):
        draw_texture("plaid", 32, np.random.default_rng(0))


def test_faces_are_scikit_images_lfw_subset_as_two_classes(defaults):
    faces = defaults["dataset_images"]("faces", 40, None, 1)
    assert sorted(faces) == ["face", "not_face"]
    assert [len(faces["face"]), len(faces["not_face"])] == [100, 100]
    assert faces["face"][0].size == (40, 40) and faces["face"][0].mode == "RGB"
    assert len(defaults["dataset_images"]("digits", 32, 7, 1)["3"]) == 7


def test_the_test_split_is_held_out_of_training_per_class(defaults, tmp_path):
    images = defaults["dataset_images"]("shapes", 32, 8, 3)
    train, test = defaults["write_split"](images, tmp_path, seed=3)
    for label in images:
        held = {p.name for p in (test / label).iterdir()}
        trained = {p.name for p in (train / label).iterdir()}
        assert len(held) == 2 and len(trained) == 6 and not held & trained


def _rows(axis_values: dict[str, list[float]], base: list[float], seconds: dict[str, float]) -> list[dict]:
    rows = [{"axis": "shipped", "value": "", "dataset": f"d{i}", "seed": 1, "accuracy": a, "seconds": 10.0}
            for i, a in enumerate(base)]
    for value, accuracies in axis_values.items():
        rows += [{"axis": "views", "value": value, "dataset": f"d{i}", "seed": 1, "accuracy": a,
                  "seconds": seconds[value]} for i, a in enumerate(accuracies)]
    return rows


def test_a_value_is_chosen_only_when_clearly_better_or_as_good_and_faster(defaults):
    verdicts = defaults["verdicts"]
    shipped = {"views": "2"}
    base = [0.80, 0.70, 0.90, 0.60]
    clearly_better = verdicts(_rows({"3": [0.85, 0.76, 0.94, 0.66], "1": [0.80, 0.71, 0.89, 0.60]}, base,
                                    {"3": 12.0, "1": 9.5}), shipped)["views"]
    by_value = {v["value"]: v for v in clearly_better["values"]}
    assert by_value["3"]["verdict"] == "better" and by_value["1"]["verdict"] == "same"
    assert by_value["3"]["difference"] == pytest.approx(0.0525)
    assert by_value["3"]["seconds_over_shipped"] == pytest.approx(1.2)
    assert clearly_better["choice"] == "3" and clearly_better["why"].startswith("better by +5.2 points")

    noisy = verdicts(_rows({"3": [0.90, 0.60, 0.95, 0.62]}, base, {"3": 12.0}), shipped)["views"]
    assert noisy["values"][1]["verdict"] == "same" and noisy["choice"] == "2"

    faster = verdicts(_rows({"1": [0.79, 0.71, 0.90, 0.59]}, base, {"1": 6.0}), shipped)["views"]
    assert faster["choice"] == "1" and "0.60 of the time" in faster["why"]

    worse = verdicts(_rows({"1": [0.70, 0.61, 0.79, 0.52]}, base, {"1": 6.0}), shipped)["views"]
    assert worse["values"][1]["verdict"] == "worse" and worse["choice"] == "2"

    once = verdicts(_rows({"1": [0.99]}, base[:1], {"1": 9.0}), shipped)["views"]
    assert math.isinf(once["values"][1]["standard_error"]) and once["values"][1]["verdict"] == "same"


def test_candidates_vary_one_setting_around_the_recipe(defaults):
    from transferkit.recipe import load_recipe

    recipe = load_recipe("quickstart")
    tried = defaults["candidates"](recipe, ["fine_lr", "unfreeze", "views", "augment"], [])
    assert [(axis, value) for axis, value, _ in tried] == [
        ("fine_lr", "x1/3"), ("fine_lr", "x3"), ("unfreeze", "2"), ("views", "1"), ("views", "3"),
        ("augment", "x0"), ("augment", "x0.5"), ("augment", "x2")]
    overrides = {(axis, value): o for axis, value, o in tried}
    assert overrides[("fine_lr", "x3")] == {"stages.1.learning_rate": pytest.approx(3 * recipe.stages[1].learning_rate)}
    assert overrides[("augment", "x2")]["augment.rotation"] == 2 * recipe.augment.rotation


def test_a_small_run_end_to_end_reports_every_run_and_its_verdict(defaults, capsys, tmp_path):
    # One axis (the verdicts' rules are tested above): two seeds, so that the difference has a standard error.
    # The quickstart recipe on the suite's small backbones (a recipe file, as --recipe takes one), so
    # that its four finetunes take seconds.
    shipped = (Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml").read_text()
    assert 'backbone = "vgg16"' in shipped
    recipe = tmp_path / "quickstart-tiny.toml"
    recipe.write_text(shipped.replace('backbone = "vgg16"', 'backbone = "tinyvgg"'))
    code = defaults["main"](["--recipe", str(recipe), "--weights", "none", "--size", "32", "--datasets", "textures",
                             "--axes", "backbone", "--backbones", "tinyvgg,tinyresnet", "--seeds", "2",
                             "--per-class", "8", "--head-epochs", "2", "--fine-epochs", "1", "--tta", "--markdown"])
    assert code == 0
    # (the transferkit logger may print to stdout too where another test in this process set it up)
    out = capsys.readouterr().out.splitlines()
    report = json.loads(next(line for line in out if line.startswith("{")))
    runs = report["runs"]
    tried = (("shipped", ""), ("backbone", "tinyresnet"))
    assert [(r["seed"], r["axis"], r["value"]) for r in runs] == [
        (seed, axis, value) for seed in (1, 2) for axis, value in tried]
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in runs)
    assert report["summary"] == defaults["verdicts"](runs, report["shipped"])
    assert math.isfinite(report["summary"]["backbone"]["values"][1]["standard_error"])
    assert report["shipped"]["backbone"] == "tinyvgg"
    assert report["machine"]["cores"] > 0
    table = [line for line in out if line.startswith("| backbone |")]
    assert table[0].startswith("| backbone | tinyvgg |") and table[1].startswith("| backbone | tinyresnet |")
    assert table[2].startswith(f"| backbone | **choice: {report['summary']['backbone']['choice']}** |")
    assert all(0 <= r["tta_accuracy"] <= 1 and r["tta_variants"][0] == "identity" for r in runs)
    assert report["tta"] == defaults["tta_summary"](runs) and report["tta"]["textures"]["runs"] == 4
    assert [line for line in out if line.startswith("| textures | 4 |")]


def test_weights_that_cannot_be_had_end_the_benchmark_in_one_line(defaults, capsys, tmp_path):
    missing = tmp_path / "nowhere.h5"
    code = defaults["main"](["--weights", str(missing), "--size", "32", "--datasets", "faces", "--axes", "views",
                             "--seeds", "1", "--per-class", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "nowhere.h5" in err[-1]


def test_the_flip_axis_tries_the_other_two_of_true_false_and_auto(defaults):
    from transferkit.recipe import load_recipe

    recipe = load_recipe("quickstart")
    assert defaults["shipped_values"](recipe)["flip"] == "auto"
    tried = defaults["candidates"](recipe, ["flip"], [])
    assert tried == [("flip", "true", {"augment.hflip": True}), ("flip", "false", {"augment.hflip": False})]
    always = load_recipe("quickstart", {"augment.hflip": True})
    assert [value for _, value, _ in defaults["candidates"](always, ["flip"], [])] == ["false", "auto"]


def test_tta_is_judged_per_dataset_on_paired_runs(defaults):
    def row(dataset, plain, averaged, loss=0.5, averaged_loss=0.4):
        return {"dataset": dataset, "accuracy": plain, "tta_accuracy": averaged, "log_loss": loss,
                "tta_log_loss": averaged_loss}

    rows = [row("digits", 0.90, 0.88), row("digits", 0.92, 0.895), row("digits", 0.91, 0.89),
            row("faces", 0.80, 0.81), row("faces", 0.70, 0.69), {"dataset": "shapes", "accuracy": 0.5}]
    summary = defaults["tta_summary"](rows)
    assert set(summary) == {"digits", "faces"}  # shapes' runs were not scored with --tta
    digits = summary["digits"]
    assert digits["runs"] == 3 and digits["accuracy_difference"] == pytest.approx(-0.0217, abs=1e-4)
    assert digits["verdict"] == "worse" and digits["log_loss_difference"] == pytest.approx(-0.1)
    assert summary["faces"]["verdict"] == "same"
    table = defaults["tta_markdown"](summary).splitlines()
    assert table[2].startswith("| digits | 3 | 91.0% -> 88.8% | -2.2 (") and table[2].endswith("| worse |")
