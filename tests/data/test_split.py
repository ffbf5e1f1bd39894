"""Group-aware splits (``data.group_by`` / ``--group-by``), the audit's folds, split.csv in
every run, and the doctor's groups on both sides."""

import csv
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.data.arrays import stratified_split
from transferkit.data.doctor import check_data
from transferkit.data.split import group_names, split_rows, stratified_folds
from transferkit.errors import DataError, RecipeError

runner = CliRunner()
PATTERN = r"^[^/]+/(p\d+)_"


def write_grouped(root: Path, classes=("cat", "dog"), patients=8, shots=3) -> Path:
    """``CLASS/pNN_S.png``: each patient photographed ``shots`` times, in every class (a
    patient's images must stay on one side, whatever their class)."""
    rng = np.random.default_rng(5)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for patient in range(patients):
            for shot in range(shots):
                pixels = np.full((36, 36, 3), 60 + 120 * label, dtype="int16") + rng.integers(-20, 20, (36, 36, 3))
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(root / name / f"p{patient:02d}_{shot}.png")
    return root


def read_split(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def groups_on_both_sides(rows: list[dict], pattern: str = PATTERN) -> set[str]:
    import re

    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(re.search(pattern, row["file"]).group(1), set()).add(row["subset"])
    return {group for group, subsets in sides.items() if len(subsets) > 1}


def test_a_split_by_group_never_splits_a_group_and_keeps_classes_on_both_sides():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    groups = np.array([f"g{rng.integers(0, 25)}" for _ in labels], dtype=object)
    for val_split in (0.1, 0.2, 0.3, 0.5):
        train, val = split_rows(labels, val_split, 42, None, groups)
        assert not set(groups[train]) & set(groups[val])
        assert sorted(np.concatenate([train, val])) == list(range(len(labels)))
        assert set(labels[val]) == set(labels[train]) == {0, 1, 2}
        assert abs(len(val) / len(labels) - val_split) < 0.06, val_split
    again = split_rows(labels, 0.2, 42, None, groups)
    other = split_rows(labels, 0.2, 7, None, groups)
    assert np.array_equal(again[1], split_rows(labels, 0.2, 42, None, groups)[1])
    assert not np.array_equal(again[1], other[1])
    # Without groups: the plain stratified split, as before.
    plain = split_rows(labels, 0.2, 42)
    assert all(np.array_equal(a, b) for a, b in zip(plain, stratified_split(labels, 0.2, 42), strict=True))


@pytest.mark.parametrize("val_split, n_groups, share", [(0.25, 5, 1 / 5), (0.2, 6, 1 / 6), (0.3, 4, 1 / 4),
                                                        (0.3, 8, 2 / 8)])
def test_groups_of_one_size_that_no_fold_count_divides_validate_the_share_nearest_the_one_asked(
        val_split, n_groups, share):
    """Five groups in four folds: one fold holds two groups. Before, the first rotation that
    kept every class was taken, whichever fold it began with: 0.4 of the images validated
    where 0.25 was asked (0.333 for 0.2 of six groups, 0.5 for 0.3 of four)."""
    labels = np.repeat([0, 1, 2], 4 * n_groups)  # in each class, every group's four images
    groups = np.array([f"p{index // 4 % n_groups}" for index in range(len(labels))], dtype=object)
    for seed in (0, 1, 42):
        train, val = split_rows(labels, val_split, seed, None, groups)
        assert not set(groups[train]) & set(groups[val])
        assert len(val) / len(labels) == pytest.approx(share), seed


def test_a_single_group_or_a_class_in_one_group_is_a_clear_error():
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(DataError, match="single group"):
        split_rows(labels, 0.5, 0, ["a", "b"], np.array(["x"] * 4, dtype=object))
    # Each class in a group of its own: whichever group validates, its class has nothing to train on.
    with pytest.raises(DataError, match="class a has its images in 1 group"):
        split_rows(labels, 0.5, 0, ["a", "b"], np.array(["g1", "g1", "g2", "g2"], dtype=object))


def test_group_names_search_the_path_below_the_data_folder(tmp_path):
    root = tmp_path / "data"
    paths = [root / "cat" / "p01_0.png", root / "dog" / "sub" / "p02_1.png"]
    assert list(group_names(paths, root, r"(p\d+)_")) == ["p01", "p02"]
    assert list(group_names(paths, root, r"^([^/]+)/")) == ["cat", "dog"]
    assert list(group_names(paths, root, r"^(p\d+)_")) == ["p01", "p02"]  # the name alone, where the path fails
    with pytest.raises(DataError, match=r"data.group_by .* does not name a group for dog/sub/p02_1.png"):
        group_names(paths, root, r"^cat/(p\d+)")
    with pytest.raises(RecipeError, match=r"data.group_by: 'p\\d\+' has no group"):  # as typed, not doubled
        transferkit.load_recipe(None, {"data.group_by": r"p\d+"})


def test_the_audit_folds_hold_each_image_out_once_and_keep_groups_whole():
    labels = np.repeat([0, 1], 30)
    groups = np.array([f"g{i // 3}" for i in range(60)], dtype=object)
    for group_of in (None, groups):
        pairs = stratified_folds(labels, group_of, 4, 0)
        held = np.concatenate([held for _, held in pairs])
        assert sorted(held) == list(range(60))
        for train, held in pairs:
            assert not set(train) & set(held)
            if group_of is not None:
                assert not set(groups[train]) & set(groups[held])
    with pytest.raises(DataError, match="fewer than the 30 folds"):
        stratified_folds(labels, groups, 30, 0)


def test_prepare_data_splits_by_group_and_lists_the_split(tmp_path):
    root = write_grouped(tmp_path / "data")
    recipe = transferkit.load_recipe(None, {"image_size": 32, "data.group_by": PATTERN, "data.val_split": 0.25})
    prepared = transferkit.prepare_data(root, recipe, verbose=0)
    rows = [dict(zip(("file", "subset"), row, strict=True)) for row in prepared.split]
    assert len(rows) == 48 and not groups_on_both_sides(rows)
    assert [row["subset"] for row in rows].count("validation") == len(prepared.val_labels) == 12
    assert prepared.split_csv().splitlines()[0] == "file,subset"
    assert rows[0]["file"].startswith(("cat/p", "dog/p"))


def test_the_doctor_names_groups_in_both_folders(tmp_path):
    train = write_grouped(tmp_path / "train", patients=4)
    val = write_grouped(tmp_path / "val", patients=6)  # p00..p03 again, and p04, p05
    report = check_data(train, image_size=32, val_dir=val, group_by=PATTERN)
    assert [group.name for group in report.shared_groups] == ["p00", "p01", "p02", "p03"]
    assert len(report.shared_groups[0].train) == len(report.shared_groups[0].validation) == 6
    assert any("group(s) of data.group_by" in problem for problem in report.problems)
    # Split by group within one folder: no group on both sides, and none reported.
    assert check_data(val, image_size=32, group_by=PATTERN, val_split=0.3).shared_groups == ()
    result = runner.invoke(app, ["doctor", str(train), "--val-dir", str(val), "--group-by", PATTERN,
                                 "--image-size", "32", "--json"])
    assert result.exit_code == 1
    assert [group["group"] for group in json.loads(result.output)["shared_groups"]] == ["p00", "p01", "p02", "p03"]


def test_every_run_lists_its_split(shapes_run, shapes_dir):
    rows = read_split(shapes_run.path / "split.csv")
    files = sorted(path.relative_to(shapes_dir).as_posix() for path in shapes_dir.rglob("*.jpg"))
    assert sorted(row["file"] for row in rows) == files
    assert sum(row["subset"] == "validation" for row in rows) == shapes_run.metrics["n_val"]
    assert {row["subset"] for row in rows} == {"train", "validation"}


def test_finetune_group_by_keeps_every_group_on_one_side(tmp_path):
    root = write_grouped(tmp_path / "data", classes=("cat", "dog", "eel"), patients=6, shots=2)
    output = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(root), "--group-by", PATTERN, "--backbone", "tinyvgg",
        "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--head-epochs", "1", "--fine-epochs", "0", "--set", "head.units=[8]", "--set", "calibrate=false",
        "--engine", "keras", "--quiet", "-o", str(output)])
    assert result.exit_code == 0, result.output
    rows = read_split(output / "split.csv")
    assert len(rows) == 36 and not groups_on_both_sides(rows)
    assert {row["subset"] for row in rows} == {"train", "validation"}
    assert tomllib.loads((output / "recipe.toml").read_text())["data"]["group_by"] == PATTERN
    held = sum(row["subset"] == "validation" for row in rows)
    card = (output / "MODEL_CARD.md").read_text()  # not "a stratified split (0.2 of each class)"
    assert (f"- **Validation:** a seeded split by group (`data.group_by` = `{PATTERN}`: no group on both sides), "
            f"{held / 36:.0%} of the images (`data.val_split` 0.2), of the same folder") in card
    unmatched = runner.invoke(app, ["finetune", str(root), "--group-by", r"^cat/(p\d+)", "--backbone", "tinyvgg",
                                    "--weights", "none",
                                    "--image-size", "32", "-o", str(tmp_path / "other")])
    assert unmatched.exit_code == 1 and "dog/p00_0.png" in unmatched.output and "data.group_by" in unmatched.output
    assert len(unmatched.output.strip().splitlines()) == 1 and not (tmp_path / "other").exists()


@pytest.mark.parametrize("command", ["tune", "doctor"])
def test_tune_and_doctor_take_group_by_and_name_a_pattern_without_a_group(command, tmp_path):
    root = write_grouped(tmp_path / "data", patients=2, shots=1)
    result = runner.invoke(app, [command, str(root), "--group-by", "p0", "-o" if command == "tune" else "--seed",
                                 str(tmp_path / "tune") if command == "tune" else "1"])
    assert result.exit_code == 2, result.output
    assert "data.group_by: 'p0' has no group" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tune").exists()


def test_folds_are_counted_on_the_files_before_decoding_and_on_the_readable_images_after(tmp_path, monkeypatch):
    from transferkit.data import prepare
    from transferkit.recipe import load_recipe

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 90, 40, 200)).save(tmp_path / name / f"{index}.png")
        (tmp_path / name / "broken.png").write_bytes(b"not a png")
    recipe = load_recipe(None, {"image_size": 32})
    decode = prepare._decode_all
    monkeypatch.setattr(prepare, "_decode_all", lambda *args: pytest.fail("decoded"))
    with pytest.raises(DataError, match="^6 image"):  # the files found: nothing decoded
        prepare.decode_folder(tmp_path, recipe, verbose=0, folds=7)
    monkeypatch.setattr(prepare, "_decode_all", decode)
    with pytest.raises(DataError, match="^4 image.*cannot be dealt into 5 folds"):  # the two broken files left out
        prepare.decode_folder(tmp_path, recipe, verbose=0, folds=5)
    assert len(prepare.decode_folder(tmp_path, recipe, verbose=0, folds=4).labels) == 4
