"""transferkit audit: out-of-sample label errors, near-copies and outliers, issues.csv /
issues.png / moves.sh, and a folder it never changes.

The folder audited: three classes that differ in colour (so that even a backbone with
random weights separates them), each image with a shape of its own on it, three files put
in the wrong class folder, one brightened copy of an image and an exact copy of another put
under a third class."""

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.trust.audit import (
    Issue,
    Signatures,
    fold_groups,
    image_signatures,
    moves_script,
    near_duplicates,
    out_of_fold_probabilities,
    outlier_scores,
    outliers,
    suspect_labels,
)

runner = CliRunner()

COLOURS = {"blue": (40, 60, 200), "green": (40, 170, 60), "red": (200, 40, 40)}
# file -> (the class folder it is put in, its true class)
MISLABELLED = {"red_03.png": ("green", "red"), "green_07.png": ("blue", "green"), "blue_05.png": ("red", "blue")}
COPY = ("green", "green_02.png", "green_02_again.png")
# (class folder, file) of an image and where an exact copy of it is put: under another class
TWIN = (("blue", "blue_09.png"), ("red", "blue_09_copy.png"))
# VGG16: its 512 random features tell the colours apart confidently, where the suite's small
# backbone leaves some of the fixes unconfident.
FLAGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--set", "head.units=[16]", "--engine", "keras", "--folds", "3", "--quiet"]


def colour_image(colour, rng, size=40) -> Image.Image:
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype("uint8")
    image = Image.fromarray(pixels)
    x, y = rng.integers(4, size - 16, 2)
    w, h = rng.integers(8, 14, 2)
    ImageDraw.Draw(image).ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(12):
            colour_image(colour, rng).save(root / name / f"{name}_{index:02d}.png")
    for file, (folder, true) in MISLABELLED.items():
        os.replace(root / true / file, root / folder / file)
    folder, original, copy = COPY
    brighter = np.clip(np.asarray(Image.open(root / folder / original), dtype="int16") + 8, 0, 255)
    Image.fromarray(brighter.astype("uint8")).save(root / folder / copy)
    (original, copy) = TWIN
    shutil.copyfile(root.joinpath(*original), root.joinpath(*copy))
    return root


def listing(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("audit") / "data")
    before = listing(root)
    output = root.parent / "out"
    result = runner.invoke(app, ["audit", str(root), *FLAGS, "-o", str(output)])
    assert result.exit_code == 0, result.output
    return root, output, result.output, before


def read_issues(output: Path) -> list[dict]:
    with open(output / "issues.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_mislabelled_files_lead_the_issues_with_their_true_class(audited):
    _, output, printed, _ = audited
    rows = read_issues(output)
    (true, _), (folder, copy) = TWIN
    mislabelled = {**MISLABELLED, copy: (folder, true)}  # the copy under another class: its class is its twin's
    top = {Path(row["file"]).name: row for row in rows[: len(mislabelled)]}
    assert set(top) == set(mislabelled), [(row["file"], row["kind"], row["score"]) for row in rows[:6]]
    for file, (folder, true) in mislabelled.items():
        row = top[file]
        assert (row["kind"], row["given"], row["suggested"], row["confident"]) == ("label", folder, true, "true")
        assert float(row["score"]) > 0.5
    assert list(rows[0]) == ["file", "given", "suggested", "score", "kind", "confident", "detail"]
    assert "likely label error" in printed and "nothing was moved" in printed
    assert "random weights (--weights none)" in printed  # the fixes of a random backbone are guesses: warned
    assert "weak evidence" not in printed  # its held-out heads are right on most images


def test_suggestions_of_heads_right_on_few_images_are_told_to_be_weak_evidence(tmp_path):
    """Noise in two folders: nothing to learn, so the held-out heads are right about half the
    time, and whatever moves they suggest are called weak before anyone runs moves.sh."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(9):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{index}.png")
    result = runner.invoke(app, ["audit", str(tmp_path / "data"), *FLAGS, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    accuracy = json.loads((tmp_path / "out" / "audit.json").read_text())["out_of_sample_accuracy"]
    confident = sum(row["confident"] == "true" for row in read_issues(tmp_path / "out"))
    assert accuracy < 0.8 and confident > 0
    assert (f"right on only {100 * accuracy:.0f}% of the images, so their {confident} suggested move(s) are weak "
            "evidence: read moves.sh") in result.output


def test_the_copies_are_near_duplicates_and_nothing_else_is(audited):
    root, output, _, _ = audited
    folder, original, copy = COPY
    (twin_class, twin), (copy_class, twin_copy) = TWIN
    duplicates = [row for row in read_issues(output) if row["kind"] == "duplicate"]
    # the copy under another class first (a conflicting duplicate), then the one within its class
    assert [(Path(row["file"]).name, row["given"], row["suggested"]) for row in duplicates] == [
        (twin_copy, copy_class, twin_class), (copy, folder, folder)]
    assert str(root / twin_class / twin) in duplicates[0]["detail"]
    assert str(root / folder / original) in duplicates[1]["detail"]


def test_an_image_and_its_copy_under_another_class_are_held_out_together(audited):
    """A head that had learnt one copy's label would "correct" the other to it, both ways:
    moves.sh would swap the two files. Held out in one fold, both get the same head's
    prediction (and only the copy whose label it contradicts moves: the test below runs
    moves.sh)."""
    root, output, _, _ = audited
    with open(output / "predictions.csv", newline="") as handle:
        rows = {Path(row["file"]).relative_to(root).as_posix(): row for row in csv.DictReader(handle)}
    original, copy = ("/".join(place) for place in TWIN)
    for name in COLOURS:
        assert float(rows[original][name]) == pytest.approx(float(rows[copy][name]), abs=1e-6)
    assert rows[original]["predicted"] == rows[copy]["predicted"] == TWIN[0][0]


def test_audit_writes_its_folder_and_moves_nothing(audited):
    root, output, _, before = audited
    assert listing(root) == before
    assert sorted(path.name for path in output.iterdir()) == [
        "audit.json", "issues.csv", "issues.png", "moves.sh", "predictions.csv", "recipe.toml"]
    assert not list(output.parent.glob(".*partial*")) and not (output.parent / "out.partial").exists()
    with Image.open(output / "issues.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 400
    summary = json.loads((output / "audit.json").read_text())
    assert summary["n_images"] == 38 and summary["folds"] == 3
    assert summary["counts"]["label"] >= len(MISLABELLED) + 1 and summary["counts"]["duplicate"] == 2
    with open(output / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 38 and set(rows[0]) >= {"file", "given", "predicted", "blue", "green", "red"}
    assert all(abs(sum(float(row[name]) for name in COLOURS) - 1) < 1e-3 for row in rows)


def test_running_moves_sh_puts_the_files_in_their_suggested_class(audited, tmp_path):
    root, output, _, before = audited
    data = shutil.copytree(root, tmp_path / "data")
    # Run on a copy of the data: TRANSFERKIT_DATA names it, the audited folder is not touched (a DATA
    # of the user's own shell is not read).
    copy_env = {**os.environ, "TRANSFERKIT_DATA": str(data), "DATA": str(tmp_path / "elsewhere")}
    subprocess.run(["sh", str(output / "moves.sh")], check=True, timeout=30, env=copy_env)
    assert listing(root) == before
    moved = {f"{folder}/{file}": f"{true}/{file}" for file, (folder, true) in MISLABELLED.items()}
    (true, _), (folder, copy) = TWIN
    moved[f"{folder}/{copy}"] = f"{true}/{copy}"
    assert listing(data) == sorted(moved.get(name, name) for name in before)
    subprocess.run(["sh", str(output / "moves.sh")], check=True, timeout=30, env={**copy_env, "SET_ASIDE": "yes"})
    folder, _, copy = COPY
    assert (tmp_path / "data-set-aside" / folder / copy).is_file()
    assert not (data / folder / copy).exists()


def test_audit_refuses_an_existing_folder_without_force_and_a_folder_inside_the_data(audited, tmp_path):
    root, output, _, _ = audited
    again = runner.invoke(app, ["audit", str(root), *FLAGS, "-o", str(output)])
    assert again.exit_code == 1 and "exists already" in again.output and "--force" in again.output
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    forced = runner.invoke(app, ["audit", str(root), *FLAGS, "-o", str(other), "--force"])
    assert forced.exit_code == 1 and "not an audit folder" in forced.output
    assert (other / "keep.txt").read_text() == "mine"
    inside = runner.invoke(app, ["audit", str(root), *FLAGS, "-o", str(root / "audit")])
    assert inside.exit_code == 1 and "is inside the data folder" in inside.output
    for result in (again, forced, inside):
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_audit_names_a_bad_group_pattern_and_a_bad_fold_count(audited):
    root, _, _, _ = audited
    no_group = runner.invoke(app, ["audit", str(root), *FLAGS, "--group-by", "red_"])
    assert no_group.exit_code == 2 and "data.group_by" in no_group.output and "no group" in no_group.output
    unmatched = runner.invoke(app, ["audit", str(root), *FLAGS, "--group-by", r"^red/(red)_"])
    assert unmatched.exit_code == 1 and "data.group_by" in unmatched.output and "blue/blue_00.png" in unmatched.output
    one_fold = runner.invoke(app, ["audit", str(root), *FLAGS[:-3], "--folds", "1"])
    assert one_fold.exit_code == 2 and "--folds" in one_fold.output


def test_more_folds_than_images_are_told_before_any_image_is_decoded(audited, monkeypatch, tmp_path):
    import transferkit.data.prepare as prepare_module
    import transferkit.trust.audit as audit_module

    root, _, _, _ = audited
    monkeypatch.setattr(audit_module, "backbone_features", lambda *args, **kwargs: pytest.fail("features computed"))
    monkeypatch.setattr(prepare_module, "_decode_all", lambda *args, **kwargs: pytest.fail("images decoded"))
    result = runner.invoke(app, ["audit", str(root), *FLAGS[:-3], "--folds", "1000", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "cannot be dealt into 1000 folds; use fewer folds" in result.output
    assert not (tmp_path / "out").exists()


# --- the parts, on numbers made to show each behaviour ------------------------------------


def test_two_classes_get_held_out_probabilities_from_one_sigmoid_head():
    import transferkit

    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 20)
    features = (rng.normal(0, 1, (40, 1, 1, 6)) + 3 * labels[:, None, None, None]).astype("float32")
    labels[[0, 25]] = [1, 0]  # two wrong labels
    recipe = transferkit.load_recipe(None, {"weights": "none", "head.units": [8], "batch_size": 8})
    probabilities = out_of_fold_probabilities(features, labels, 2, recipe, folds=4, verbose=0)
    assert probabilities.shape == (40, 2) and np.allclose(probabilities.sum(axis=1), 1)
    verdict = suspect_labels(probabilities, labels)
    assert set(np.argsort(-verdict.score)[:2]) == {0, 25}
    assert list(verdict.suggested[[0, 25]]) == [0, 1]


def test_folds_keep_each_group_and_each_set_of_near_copies_whole():
    assert fold_groups(None, [], 6) is None
    copies = [(0, 4, 1), (4, 5, 0)]  # 0 ~ 4 ~ 5: one set
    assert fold_groups(None, copies, 6).tolist() == [0, 1, 2, 3, 0, 0]
    groups = np.array(["a", "b", "a", "c", "d", "e"], dtype=object)  # 0 and 2 one group; 4 copies 0
    joined = fold_groups(groups, copies, 6)
    assert len({joined[i] for i in (0, 2, 4, 5)}) == 1 and len(set(joined.tolist())) == 3


def test_confident_learning_suggests_the_class_the_held_out_head_is_sure_of():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    probabilities = np.array([
        [0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.05, 0.9, 0.05],  # the third: labelled 0, surely 1
        [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.4, 0.45, 0.15],    # the last: doubtful, its label likeliest
        [0.1, 0.1, 0.8], [0.5, 0.1, 0.4],                       # the last: 0 likelier, not confidently
    ])
    verdict = suspect_labels(probabilities, labels)
    assert np.allclose(verdict.thresholds, [np.mean([0.9, 0.8, 0.05]), np.mean([0.8, 0.7, 0.45]), 0.6])
    assert list(np.flatnonzero(verdict.listed)) == [2, 7]
    assert verdict.suggested[2] == 1 and verdict.confident[2]
    assert verdict.suggested[7] == 0 and not verdict.confident[7]  # 0.5 < threshold of class 0 (0.583)
    assert np.allclose(verdict.score, 1 - probabilities[np.arange(8), labels])


def test_the_one_image_of_a_class_is_never_a_confident_move():
    """Its held-out head trained without its class, so it could not have given it: the image
    looks mislabelled whatever it shows, and moving it would empty the class."""
    labels = np.array([0, 0, 0, 0, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.85, 0.15], [0.9, 0.1], [0.97, 0.03]])
    verdict = suspect_labels(probabilities, labels)
    assert verdict.listed[4] and verdict.suggested[4] == 0 and not verdict.confident[4]
    assert "/0.png" not in moves_script(
        [Issue(Path("/data/single/0.png"), "single", "many", 0.97, "label", confident=bool(verdict.confident[4]))],
        "/data")


def test_captions_of_issues_png_fit_their_column_and_a_copy_names_what_it_copies():
    from transferkit.trust.audit import _caption

    long = "an extraordinarily long class name here"
    label = _caption(Issue(Path("/d/x/img_0.png"), long, "another very long class name x 35ch", 0.91, "label"))
    copy = _caption(Issue(Path("/d/x/b.png"), "rare", "rare", 0.98, "duplicate", copy_of=Path("/d/rare/a30.png")))
    assert all(len(line) <= 22 for line in label.splitlines() + copy.splitlines())
    assert label.splitlines()[1] == "given: an extr\u2026me here" and copy.splitlines()[2] == "copy of a30.png"


def test_outliers_are_far_beyond_the_typical_neighbour_distance():
    rng = np.random.default_rng(0)
    cluster = rng.normal(0, 0.05, (40, 16)) + np.eye(16)[0]
    far = np.eye(16)[5]
    embeddings = np.vstack([cluster, far])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = outlier_scores(embeddings, neighbours=5)
    assert list(outliers(distances)) == [40]
    assert list(outliers(outlier_scores(embeddings[:40]))) == []


def test_near_duplicates_need_close_hashes_correlated_pixels_and_alike_features():
    rng = np.random.default_rng(1)
    images = np.stack([np.asarray(colour_image((120, 120, 120), rng, 32)) for _ in range(4)])
    images[2] = np.clip(images[0].astype("int16") + 6, 0, 255)  # a brightened copy of the first
    images[3] = images[1][:, ::-1]  # a mirror image: another picture
    signatures = image_signatures(images)
    same = np.ones((4, 3), dtype="float32") / np.sqrt(3)
    bits = bin(int(signatures.hashes[0]) ^ int(signatures.hashes[2])).count("1")
    assert near_duplicates(signatures, same) == [(0, 2, bits)]
    unlike = np.eye(4, dtype="float32")  # the features disagree: not a copy
    assert near_duplicates(signatures, unlike) == []
    flat = Signatures(np.zeros(4, dtype=np.uint64), signatures.thumbnails)  # hashes alike, pixels not
    assert [(i, j) for i, j, _ in near_duplicates(flat, same)] == [(0, 2)]


def test_moves_sh_quotes_every_name_and_sets_aside_only_when_asked(tmp_path):
    data = tmp_path / "my data"
    names = ["it's $HOME.png", "new\nline.png", "semi;colon `x`.png", "-dash.png"]
    for name in names:
        (data / "cat").mkdir(parents=True, exist_ok=True)
        (data / "cat" / name).write_bytes(b"x")
    (data / "cat" / "odd").mkdir()
    (data / "cat" / "odd" / "deep.png").write_bytes(b"x")
    issues = [Issue(data / "cat" / name, "cat", "dog", 0.9, "label", confident=True) for name in names[:3]]
    issues += [Issue(data / "cat" / "odd" / "deep.png", "cat", "dog", 0.8, "label", confident=True),
               Issue(data / "cat" / names[3], "cat", "cat", 0.5, "outlier"),
               Issue(data / "cat" / names[0], "cat", "cat", 0.4, "outlier"),  # moved already: not twice
               Issue(data / "cat" / "nope.png", "cat", "dog", 0.3, "label", confident=False)]
    script = tmp_path / "moves.sh"
    script.write_text(moves_script(issues, data))
    assert all("\n" not in line for line in script.read_text().split("\n") if line.startswith("#"))
    subprocess.run(["sh", str(script)], check=True, cwd=tmp_path, timeout=30)
    assert sorted(path.name for path in (data / "dog").iterdir()) == sorted([*names[:3], "odd"])
    assert (data / "dog" / "odd" / "deep.png").is_file()
    assert (data / "cat" / names[3]).is_file() and not (tmp_path / "my data-set-aside").exists()
    subprocess.run(["sh", str(script)], check=True, cwd=tmp_path, timeout=30, env={**os.environ, "SET_ASIDE": "yes"})
    assert (tmp_path / "my data-set-aside" / "cat" / names[3]).is_file()
    assert sorted(path.name for path in (data / "dog").iterdir()) == sorted([*names[:3], "odd"])


def test_moves_sh_moves_a_file_whose_name_is_taken_under_another_and_names_one_it_cannot(tmp_path):
    """IMG_0001.jpg in every class folder: a fix whose name is taken in its new class takes
    NAME-from-CLASS; where that is taken too it stays, named on stderr, and the script ends 1."""
    data = tmp_path / "data"
    for folder in ("cat", "dog"):
        (data / folder).mkdir(parents=True)
        for name in ("0.png", "1.png"):
            (data / folder / name).write_bytes(folder.encode())
    (data / "dog" / "1-from-cat.png").write_bytes(b"there already")
    issues = [Issue(data / "cat" / name, "cat", "dog", 0.9, "label", confident=True) for name in ("0.png", "1.png")]
    script = tmp_path / "moves.sh"
    script.write_text(moves_script(issues, data))
    done = subprocess.run(["sh", str(script)], cwd=tmp_path, timeout=30, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"not moved, its new name is taken: {data}/cat/1.png",
                                        "1 file(s) not moved: their new names are taken (listed above); "
                                        "move them by hand"]
    assert (data / "dog" / "0-from-cat.png").read_bytes() == b"cat" and (data / "dog" / "0.png").read_bytes() == b"dog"
    assert sorted(path.name for path in (data / "cat").iterdir()) == ["1.png"]
    assert (data / "dog" / "1-from-cat.png").read_bytes() == b"there already"


def test_a_folder_that_cannot_be_audited_is_told_in_its_one_line_alone(tmp_path):
    """One class folder: the error, without the random-weights warning before it."""
    (tmp_path / "data" / "only").mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (32, 32), (index * 50, 0, 0)).save(tmp_path / "data" / "only" / f"{index}.png")
    result = runner.invoke(app, ["audit", str(tmp_path / "data"), *FLAGS, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith(("error:", "warning:"))] == [
        f"error: {tmp_path / 'data'} has only one class folder (only); a classifier needs at least two classes, "
        "each in its own sub-folder"]
