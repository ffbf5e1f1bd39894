import json
import shutil

import pytest
from PIL import Image

from transferkit.data.arrays import stratified_split
from transferkit.data.doctor import check_data
from transferkit.data.folders import index_folder
from transferkit.errors import DataError, RecipeError

CLASSES = ("circle", "square", "triangle")


@pytest.fixture()
def data_dir(shapes_dir, tmp_path):
    """A private copy of the 3 x 10 shapes folder, free to modify."""
    return shutil.copytree(shapes_dir, tmp_path / "data")


def check(folder, **kwargs):
    # 64 px training size: the 40 px shapes are above the default minimum side of 32.
    return check_data(folder, image_size=64, **kwargs)


def test_clean_folder_is_clean_with_counts(data_dir):
    report = check(data_dir)
    assert report.is_clean(), report.problems
    assert report.problems == [] and report.warnings == []
    assert report.class_counts == {name: 10 for name in CLASSES}
    assert report.imbalance_ratio == 1.0
    assert report.colour_modes == {"RGB": 30}
    assert not (report.unreadable or report.duplicates_within_class or report.conflicting_duplicates
                or report.split_leakage or report.small_images)
    assert "no problems found" in report.format_text()


def test_copy_inside_a_class_is_a_within_class_duplicate(data_dir):
    copy = shutil.copy(data_dir / "square" / "square_003.jpg", data_dir / "square" / "again.jpg")
    report = check(data_dir)
    assert report.duplicates_within_class == ((copy, data_dir / "square" / "square_003.jpg"),)
    assert not report.conflicting_duplicates
    assert not report.is_clean()
    assert any("same class" in problem for problem in report.problems)


def test_same_file_in_two_classes_is_a_conflicting_duplicate(data_dir):
    original = data_dir / "circle" / "circle_001.jpg"
    copy = shutil.copy(original, data_dir / "triangle" / "looks_like_circle.jpg")
    report = check(data_dir)
    (group,) = report.conflicting_duplicates
    assert group.classes == ("circle", "triangle")
    assert set(group.paths) == {original, copy}
    assert not report.duplicates_within_class
    assert any("conflicting labels" in problem for problem in report.problems)


def test_leakage_follows_the_split_training_makes(data_dir):
    # One duplicate pair: it leaks exactly for the seeds whose stratified split, over the same
    # labels as training, sends one copy to training and the other to validation.
    original = data_dir / "circle" / "circle_000.jpg"
    copy = shutil.copy(original, data_dir / "circle" / "zz_copy.jpg")
    index = index_folder(data_dir)
    positions = [index.paths.index(original), index.paths.index(copy)]

    def separated(seed):
        _, val_rows = stratified_split(index.labels, 0.2, seed)
        return (positions[0] in val_rows) != (positions[1] in val_rows)

    seeds = range(40)
    leaking = next(seed for seed in seeds if separated(seed))
    together = next(seed for seed in seeds if not separated(seed))
    (group,) = check(data_dir, seed=leaking).split_leakage
    assert set(group.train + group.validation) == {original, copy}
    assert len(group.train) == 1 and len(group.validation) == 1
    assert check(data_dir, seed=together).split_leakage == ()


def test_a_class_of_identical_images_always_leaks(data_dir):
    first = data_dir / "square" / "square_000.jpg"
    for path in sorted((data_dir / "square").iterdir())[1:]:
        shutil.copy(first, path)
    report = check(data_dir, seed=7)
    (group,) = report.split_leakage
    assert {path.parent.name for path in group.train + group.validation} == {"square"}
    assert len(group.validation) == 2 and len(group.train) == 8  # round(10 * 0.2) held out
    assert any("both training and validation" in problem for problem in report.problems)


def test_val_dir_copy_of_a_training_image_is_leakage(data_dir, tmp_path):
    val_dir = tmp_path / "val"
    for name in CLASSES:
        (val_dir / name).mkdir(parents=True)
        shutil.copy(data_dir / name / f"{name}_009.jpg", val_dir / name / "moved.jpg")
        (data_dir / name / f"{name}_009.jpg").unlink()
    assert check(data_dir, val_dir=val_dir).is_clean()

    leaked = shutil.copy(data_dir / "square" / "square_002.jpg", val_dir / "square" / "leaked.jpg")
    report = check(data_dir, val_dir=val_dir)
    (group,) = report.split_leakage
    assert group.train == (data_dir / "square" / "square_002.jpg",) and group.validation == (leaked,)
    assert report.val_class_counts == {"circle": 1, "square": 2, "triangle": 1}
    assert not report.duplicates_within_class and not report.is_clean()


def test_val_dir_with_other_classes_is_a_data_error(data_dir, tmp_path):
    for name in ("circle", "oval"):
        (tmp_path / "val" / name).mkdir(parents=True)
        shutil.copy(data_dir / "circle" / "circle_000.jpg", tmp_path / "val" / name / "a.jpg")
    with pytest.raises(DataError, match="same class sub-folders"):
        check(data_dir, val_dir=tmp_path / "val")


def test_a_folder_index_given_is_not_walked_again(data_dir, tmp_path, monkeypatch):
    """finetune indexes each folder once and hands the index to the doctor."""
    import transferkit.data.folders as folders

    val = tmp_path / "val"
    for name in CLASSES:
        (val / name).mkdir(parents=True)
        shutil.copy(data_dir / name / f"{name}_000.jpg", val / name / "a.jpg")
    index, val_index = folders.index_folders(data_dir, val)
    walked = check(data_dir, val_dir=val)

    def no_walk(*args, **kwargs):
        raise AssertionError("the folder was indexed again")

    monkeypatch.setattr(folders, "index_folder", no_walk)
    monkeypatch.setattr(folders, "iter_image_files", no_walk)
    given = check(index, val_dir=val_index)
    assert given == walked


def test_the_val_dir_class_check_is_one_for_every_caller(data_dir, tmp_path):
    from transferkit.data.folders import index_folder, index_folders

    for name in ("circle", "oval"):
        (tmp_path / "val" / name).mkdir(parents=True)
        shutil.copy(data_dir / "circle" / "circle_000.jpg", tmp_path / "val" / name / "a.jpg")
    with pytest.raises(DataError, match=r"validation folder .*val has classes circle, oval but .*data has circle, "
                                        r"square, triangle; both need the same class sub-folders"):
        index_folders(index_folder(data_dir), tmp_path / "val")


def test_empty_and_text_files_named_jpg_are_unreadable(data_dir):
    empty = data_dir / "circle" / "empty.jpg"
    empty.write_bytes(b"")
    text = data_dir / "square" / "notes.jpg"
    text.write_text("not an image")
    truncated = data_dir / "triangle" / "truncated.jpg"
    truncated.write_bytes((data_dir / "triangle" / "triangle_000.jpg").read_bytes()[:300])
    report = check(data_dir)
    assert [path for path, _ in report.unreadable] == [empty, text, truncated]
    # The reason alone: the path is shown beside it already.
    assert all(reason and not reason.startswith(str(path)) for path, reason in report.unreadable)
    assert report.class_counts == {name: 10 for name in CLASSES}  # readable images only
    assert report.problems[0].startswith("3 unreadable file(s)")


def test_other_extensions_are_a_warning_only(data_dir):
    (data_dir / "circle" / "labels.csv").write_text("a,b\n")
    report = check(data_dir)
    assert report.is_clean()
    assert [path.name for path, _ in report.ignored] == ["labels.csv"]
    assert report.warnings == ["1 file(s) without an image extension are ignored"]


def test_tiny_image_is_small_for_the_training_size(data_dir):
    tiny = data_dir / "circle" / "tiny.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(tiny)
    report = check(data_dir)
    assert report.min_side == 32
    assert report.small_images == ((tiny, 4, 4),)
    assert any("under 32 px" in problem for problem in report.problems)
    # The 40 px shapes themselves are small for the default 128 px training size.
    assert len(check_data(data_dir).small_images) == 31
    assert check_data(data_dir, min_side=4).small_images == ()


def test_grayscale_among_rgb_is_a_warning_only(data_dir):
    gray = Image.open(data_dir / "circle" / "circle_000.jpg").convert("L")
    gray.save(data_dir / "circle" / "gray.jpg")
    report = check(data_dir)
    assert report.colour_modes == {"RGB": 30, "L": 1}
    assert report.is_clean()
    assert len(report.warnings) == 1 and "mixed colour modes" in report.warnings[0]


def test_imbalance_above_the_limit_is_a_problem(data_dir):
    for path in sorted((data_dir / "triangle").iterdir())[2:]:
        path.unlink()
    report = check(data_dir)
    assert report.class_counts["triangle"] == 2
    assert report.imbalance_ratio == 5.0
    assert any("imbalanced" in problem and "triangle" in problem for problem in report.problems)
    assert check(data_dir, imbalance_limit=5.0).is_clean()


def test_class_without_enough_readable_images_is_reported_not_raised(data_dir):
    for path in sorted((data_dir / "square").iterdir())[1:]:
        path.write_bytes(b"")
    report = check(data_dir)
    assert report.class_counts["square"] == 1
    assert report.imbalance_ratio == 10.0
    assert any("single readable image" in problem for problem in report.problems)
    for path in (data_dir / "square").iterdir():
        path.write_bytes(b"")
    report = check(data_dir)
    assert report.imbalance_ratio is None
    assert any("no readable image" in problem for problem in report.problems)
    json.dumps(report.to_dict())


def test_a_class_folder_without_readable_images_is_named_by_its_path(data_dir, monkeypatch):
    """doctor DATA/ lists the folder as DATA/square, the path as the user gave its parent."""
    from typer.testing import CliRunner

    from transferkit.cli import app

    for path in (data_dir / "square").iterdir():
        path.write_bytes(b"not an image")
    monkeypatch.chdir(data_dir.parent)
    result = CliRunner().invoke(app, ["doctor", f"{data_dir.name}/", "--image-size", "64"])
    assert result.exit_code == 1
    finding = next(line for line in result.output.splitlines() if "hold no readable image" in line)
    lines = result.output.splitlines()
    assert lines[lines.index(finding) + 1].strip() == f"{data_dir.name}/square"
    # A class folder holding no file at all is the same finding, in the whole report (it was
    # an error that stopped the doctor before its other findings).
    for path in (data_dir / "square").iterdir():
        path.unlink()
    result = CliRunner().invoke(app, ["doctor", f"{data_dir.name}/", "--image-size", "64"])
    assert result.exit_code == 1 and "error:" not in result.output
    finding = next(line for line in result.output.splitlines() if "hold no readable image" in line)
    lines = result.output.splitlines()
    assert lines[lines.index(finding) + 1].strip() == f"{data_dir.name}/square"


def test_folder_errors_propagate(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_data(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        check_data(tmp_path / "flat")


def test_arguments_out_of_range_name_the_value(data_dir):
    with pytest.raises(RecipeError, match="val_split.*1.5"):
        check_data(data_dir, val_split=1.5)
    with pytest.raises(RecipeError, match="imbalance_limit.*0.5"):
        check_data(data_dir, imbalance_limit=0.5)


def test_to_dict_is_json_and_text_lists_every_class_and_trims_examples(data_dir):
    shutil.copy(data_dir / "circle" / "circle_001.jpg", data_dir / "square" / "odd.jpg")
    for number in range(13):
        (data_dir / "triangle" / f"broken_{number:02d}.jpg").write_bytes(b"")
    report = check(data_dir)
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["clean"] is False
    assert payload["class_counts"] == {"circle": 10, "square": 11, "triangle": 10}
    assert payload["conflicting_duplicates"][0]["classes"] == ["circle", "square"]
    assert all(isinstance(entry["path"], str) for entry in payload["unreadable"])
    assert payload["problems"] == report.problems

    text = report.format_text()
    for name in CLASSES:
        assert name in text
    assert "broken_09.jpg" in text and "broken_10.jpg" not in text
    assert "and 3 more" in text
    assert "problem(s):" in text and "conflicting labels" in text


def test_the_learning_checks_flags_without_model_are_said_to_be_ignored(data_dir):
    from typer.testing import CliRunner

    from transferkit.cli import app

    result = CliRunner().invoke(app, ["doctor", str(data_dir), "--image-size", "64", "--weights", "none",
                                      "--batch-size", "4"])
    assert "warning: --weights, --batch-size: ignored, they apply to the learning checks (--model)" in result.output
    plain = CliRunner().invoke(app, ["doctor", str(data_dir), "--image-size", "64"])
    assert "ignored" not in plain.output and plain.exit_code == result.exit_code
