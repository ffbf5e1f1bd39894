"""Where a command writes, it never destroys or pollutes what it reads: an output folder is
never a run it was not asked to replace, never inside the images it reads (where its files
would become a class), symbolic links seen through; and a bad -o is one line, before any
work, with nothing created."""

import os
import shutil

import pytest
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.errors import RunError

runner = CliRunner()


def listing(root):
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))


def one_error_line(result, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_run_folder_reached_through_a_link_to_the_data_is_inside_the_data(shapes_dir, tmp_path):
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    (tmp_path / "link").symlink_to(data)
    before = listing(data)
    with pytest.raises(RunError, match="inside the data folder"):
        transferkit.finetune(data, None, {"weights": "none"}, output=tmp_path / "link" / "run", verbose=0)
    with pytest.raises(RunError, match="inside the data folder"):
        transferkit.finetune(tmp_path / "link", None, {"weights": "none"}, output=data / "run", verbose=0)
    assert listing(data) == before


def test_evaluate_never_replaces_a_run_and_never_writes_into_the_images(shapes_run, shapes_dir, tmp_path):
    victim = shutil.copytree(shapes_run.path, tmp_path / "victim")
    before = listing(victim)
    line = one_error_line(runner.invoke(app, ["evaluate", str(shapes_run.path), str(shapes_dir), "-o", str(victim),
                                              "--force", "-q"]))
    assert "is a run folder" in line and "--force replaces only evaluation folders" in line
    assert listing(victim) == before and transferkit.load_run(victim).model is not None
    # A folder of someone's with a metrics.json of its own (a common name) is not an evaluation.
    project = tmp_path / "project"
    project.mkdir()
    (project / "metrics.json").write_text("{}")
    (project / "notes.txt").write_text("mine")
    line = one_error_line(runner.invoke(app, ["evaluate", str(shapes_run.path), str(shapes_dir), "-o", str(project),
                                              "--force", "-q"]))
    assert "is not an evaluation folder" in line and (project / "notes.txt").read_text() == "mine"
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    line = one_error_line(runner.invoke(app, ["evaluate", str(shapes_run.path), str(data), "-o",
                                              str(data / "ev"), "-q"]))
    assert "inside the data folder" in line and not (data / "ev").exists()


def test_explain_refuses_a_run_the_images_folder_and_a_file_in_the_path_before_any_work(shapes_run, shapes_dir,
                                                                                       tmp_path):
    victim = shutil.copytree(shapes_run.path, tmp_path / "victim")
    before = listing(victim)
    images = shapes_dir / shapes_run.class_names[0]
    line = one_error_line(runner.invoke(app, ["explain", str(shapes_run.path), str(images), "-o", str(victim),
                                              "--force"]))
    assert "not an explain folder" in line and listing(victim) == before
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    one_image = sorted((data / shapes_run.class_names[0]).iterdir())[0]
    line = one_error_line(runner.invoke(app, ["explain", str(shapes_run.path), str(one_image), "-o",
                                              str(one_image.parent / "heat")]))
    assert "inside the data folder" in line and not (one_image.parent / "heat").exists()
    (tmp_path / "afile").write_text("keep me")
    line = one_error_line(runner.invoke(app, ["explain", str(shapes_run.path), str(images), "-o",
                                              str(tmp_path / "afile" / "x")]))
    assert "afile is a file" in line and (tmp_path / "afile").read_text() == "keep me"


def test_tune_refuses_another_kind_of_folder_and_leaves_nothing_when_the_data_is_wrong(shapes_run, shapes_dir,
                                                                                      tmp_path):
    pytest.importorskip("optuna", reason="the tune extra is not installed")
    victim = shutil.copytree(shapes_run.path, tmp_path / "victim")
    before = listing(victim)
    flags = ["--backbone", "tinyvgg", "--weights", "none", "--trials", "1", "-q"]
    line = one_error_line(runner.invoke(app, ["tune", str(shapes_dir), *flags, "-o", str(victim)]))
    assert "not a tune folder" in line and listing(victim) == before
    (tmp_path / "afile").write_text("keep me")
    line = one_error_line(runner.invoke(app, ["tune", str(shapes_dir), *flags, "-o", str(tmp_path / "afile")]))
    assert "is a file" in line and (tmp_path / "afile").read_text() == "keep me"
    line = one_error_line(runner.invoke(app, ["tune", str(tmp_path / "nowhere"), *flags, "-o",
                                              str(tmp_path / "study")]))
    assert "nowhere does not exist" in line and not (tmp_path / "study").exists()
    assert sorted(os.listdir(tmp_path)) == ["afile", "victim"]  # nothing else was made beside them


def test_lr_find_checks_its_plot_before_the_range_test(shapes_dir, tmp_path):
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    before = listing(data)
    (tmp_path / "afile").write_text("keep me")
    flags = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--steps", "5"]
    for target, code, fragment in [(data / "circle" / "lr.png", 1, "inside the data folder"),
                                   (tmp_path / "lr.txt", 2, "use a .png file name"),  # a bad flag value
                                   (tmp_path / "afile" / "lr.png", 1, "afile is a file")]:
        line = one_error_line(runner.invoke(app, ["lr-find", str(data), *flags, "-o", str(target)]), code)
        assert fragment in line and "learning-rate range test" not in line
    assert listing(data) == before and (tmp_path / "afile").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile", "data"]


def test_export_never_writes_into_the_data_folder_it_checks_on(shapes_run, shapes_dir, tmp_path):
    pytest.importorskip("tensorflow")
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    before = listing(data)
    line = one_error_line(runner.invoke(app, ["export", str(shapes_run.path), "--format", "keras", "-o",
                                              str(data / "exported"), "--data", str(data)]))
    assert "inside the data folder" in line and listing(data) == before
    (tmp_path / "afile").write_text("keep me")
    for target, fragment in [(tmp_path / "afile", "afile is a file; pass a folder path"),
                             (tmp_path / "afile" / "x", "afile is a file; choose another -o")]:
        for force in ([], ["--force"]):
            line = one_error_line(runner.invoke(app, ["export", str(shapes_run.path), "--format", "keras", "-o",
                                                      str(target), *force]))
            assert fragment in line, line
    assert (tmp_path / "afile").read_text() == "keep me"


def test_an_evaluation_whose_folder_cannot_be_made_is_refused_before_the_images_are_read(shapes_run, shapes_dir,
                                                                                         tmp_path):
    (tmp_path / "afile").write_text("keep me")
    line = one_error_line(runner.invoke(app, ["evaluate", str(shapes_run.path), str(shapes_dir), "-o",
                                              str(tmp_path / "afile" / "x"), "-q"]))
    assert "afile is a file" in line and (tmp_path / "afile").read_text() == "keep me"


def test_an_augmentation_preview_is_never_written_among_the_images_read(shapes_dir, tmp_path):
    data = shutil.copytree(shapes_dir, tmp_path / "data")
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    before = listing(data)
    for target in (data / "circle" / "preview.png", tmp_path / "link" / "preview.png"):
        line = one_error_line(runner.invoke(app, ["augment-preview", str(data), "-o", str(target)]))
        assert "preview" in line and "inside the data folder" in line  # it would be trained on as a circle
    assert listing(data) == before
    # beside the images, both are written, an earlier preview replaced only with --force
    assert runner.invoke(app, ["augment-preview", str(data), "-o", str(tmp_path / "preview.png")]).exit_code == 0
    more = runner.invoke(app, ["augment-preview", str(data), "-o", str(tmp_path / "all.png"), "--count", "1000"])
    assert more.exit_code == 0 and "fewer than --count 1000: the preview shows each of them" in more.output
    first = (tmp_path / "preview.png").read_bytes()
    line = one_error_line(runner.invoke(app, ["augment-preview", str(data), "-o", str(tmp_path / "preview.png"),
                                              "--seed", "3"]))
    assert "exists already; pass --force" in line and (tmp_path / "preview.png").read_bytes() == first
    replaced = runner.invoke(app, ["augment-preview", str(data), "-o", str(tmp_path / "preview.png"), "--seed", "3",
                                   "--force"])
    assert replaced.exit_code == 0 and (tmp_path / "preview.png").read_bytes() != first


def test_predictions_never_replace_a_file_unasked_nor_land_in_the_run(shapes_run, shapes_dir, tmp_path):
    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("labels.json", "history.csv")}
    for target in (run / "labels.json", run / "history.csv", run / "sub" / "p.csv"):
        line = one_error_line(runner.invoke(app, ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o",
                                                  str(target), "--force"]))
        assert "inside the run folder" in line
    assert {name: (run / name).read_bytes() for name in before} == before and not (run / "sub").exists()
    (tmp_path / "keep.csv").write_text("precious\n")
    line = one_error_line(runner.invoke(app, ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o",
                                              str(tmp_path / "keep.csv")]))
    assert "exists already; pass --force" in line and (tmp_path / "keep.csv").read_text() == "precious\n"
    replaced = runner.invoke(app, ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o",
                                   str(tmp_path / "keep.csv"), "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "keep.csv").read_text().startswith("file,label,confidence")


def test_an_evaluation_is_never_written_into_the_runs_own_data_folder(shapes_run, shapes_dir, tmp_path):
    import json

    data = shutil.copytree(shapes_dir, tmp_path / "data")
    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    labels = json.loads((run / "labels.json").read_text())
    (run / "labels.json").write_text(json.dumps({**labels, "data_dir": str(data)}))
    before = listing(data)
    line = one_error_line(runner.invoke(app, ["evaluate", str(run), str(shapes_dir), "-o", str(data / "circle" / "x"),
                                              "-q"]))
    assert "evaluation folder" in line and "inside the data folder" in line  # its PNGs would become circles
    assert listing(data) == before


def test_a_folder_named_like_a_runs_in_progress_folder_is_never_trained_into_nor_removed(shapes_run, shapes_dir,
                                                                                         tmp_path, monkeypatch):
    flags = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "-q"]
    line = one_error_line(runner.invoke(app, ["finetune", str(shapes_dir), *flags, "-o", str(tmp_path / "v.partial")]))
    assert "v.partial: a name ending in .partial is where transferkit keeps a run" in line
    assert not (tmp_path / "v.partial").exists()
    # A finished run renamed to v.partial (or anything someone put there) is not an interrupted
    # run of v: a new run of v stops instead of removing it, whatever --force says.
    kept = shutil.copytree(shapes_run.path, tmp_path / "runs" / "v.partial")
    before = listing(kept)
    for force in ([], ["--force"]):
        line = one_error_line(runner.invoke(app, ["finetune", str(shapes_dir), *flags, "-o",
                                                  str(tmp_path / "runs" / "v"), *force]))
        assert f"{kept} holds MODEL_CARD.md, confusion.png, history.csv, ..., which no transferkit run left" in line
        assert "move it away, or choose another -o" in line
    assert listing(kept) == before and sorted(os.listdir(tmp_path / "runs")) == ["v.partial"]
    # -o . names the folder it is in (its in-progress folder beside it), in one line
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    line = one_error_line(runner.invoke(app, ["finetune", str(shapes_dir), *flags, "-o", "."]))
    assert "run folder . exists already" in line
    line = one_error_line(runner.invoke(app, ["finetune", "--resume", "."]))
    assert f"nothing to resume: no interrupted run at {tmp_path / 'here'}.partial" in line


def test_no_file_output_lands_in_another_run_whatever_force_says(shapes_run, shapes_dir, tmp_path, monkeypatch):
    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    other = shutil.copytree(shapes_run.path, tmp_path / "other")
    (tmp_path / "link").symlink_to(other, target_is_directory=True)
    before = {path: path.read_bytes() for path in other.rglob("*") if path.is_file()}
    commands = [["predict", str(run), str(shapes_dir / "circle"), "-q", "-o", "{}/labels.json"],
                ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o", "{}/new/predictions.csv"],
                ["augment-preview", str(shapes_dir), "-o", "{}/confusion.png"],
                ["lr-find", str(shapes_dir), "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32",
                 "-o", "{}/history.png"]]
    what = {"predict": "--output", "augment-preview": "preview", "lr-find": "plot"}
    for folder in (other, tmp_path / "link"):
        for command in commands:
            target = command[-1].format(folder)
            line = one_error_line(runner.invoke(app, [*command[:-1], target, "--force"]))
            assert line == (f"error: {what[command[0]]} {target} is inside the run folder {folder} (it would replace "
                            "or mix with the run's own files); write it elsewhere"), line
    assert {path: path.read_bytes() for path in other.rglob("*") if path.is_file()} == before
    # Beside a run, reached from inside it: not in it
    monkeypatch.chdir(other)
    written = runner.invoke(app, ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o", "../beside.csv"])
    assert written.exit_code == 0 and (tmp_path / "beside.csv").is_file(), written.output
    # A labels.json alone (a common file name) does not make a folder a run
    project = tmp_path / "project"
    project.mkdir()
    (project / "labels.json").write_text("{}")
    written = runner.invoke(app, ["predict", str(run), str(shapes_dir / "circle"), "-q", "-o",
                                  str(project / "p.csv")])
    assert written.exit_code == 0 and (project / "p.csv").is_file(), written.output


def test_a_file_given_for_the_run_is_told_as_not_a_run(shapes_run, shapes_dir):
    inside = shapes_run.path / "labels.json"
    line = one_error_line(runner.invoke(app, ["predict", str(inside), str(shapes_dir / "circle"), "-q"]))
    assert line == (f"error: {inside} is a file, not a run; pass the run folder made by 'transferkit finetune' "
                    f"(here {shapes_run.path}) or its model.keras")
    image = sorted(shapes_dir.rglob("*.jpg"))[0]  # the two arguments swapped
    for command in (["predict", str(image), str(shapes_run.path)], ["evaluate", str(image), str(shapes_dir)],
                    ["export", str(image), "--format", "keras"], ["report", str(image)]):
        line = one_error_line(runner.invoke(app, command))
        assert line.endswith(f"{image} is a file, not a run; pass the run folder made by 'transferkit finetune' "
                             "or its model.keras"), line


def test_an_augmentation_preview_where_a_folder_or_file_stands_is_one_line(shapes_dir, tmp_path):
    (tmp_path / "shown.png").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    for target, fragment in [(tmp_path / "shown.png", "shown.png is a folder; name a file in it"),
                             (tmp_path / "notes.txt" / "p.png", "notes.txt is a file; choose another -o")]:
        for force in ([], ["--force"]):
            line = one_error_line(runner.invoke(app, ["augment-preview", str(shapes_dir), "-o", str(target), *force]))
            assert fragment in line, line
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not any((tmp_path / "shown.png").iterdir())


def test_a_benchmark_file_beside_the_data_folder_is_fine_and_inside_it_is_not(shapes_run, tmp_path):
    from transferkit.export.benchmark import check_benchmark_output

    data = tmp_path / "data"
    (data / "circle").mkdir(parents=True)
    check_benchmark_output(tmp_path / "bench.json", shapes_run.path, False, [data])  # its folder holds the data
    with pytest.raises(RunError, match="benchmark file .*inside the data folder"):
        check_benchmark_output(data / "bench.json", shapes_run.path, False, [data])
    with pytest.raises(RunError, match="is inside the run folder"):  # only RUN/benchmark.json itself
        check_benchmark_output(shapes_run.path / "sub" / "benchmark.json", shapes_run.path, True)
    check_benchmark_output(shapes_run.path / "benchmark.json", shapes_run.path, True)


def test_evaluate_and_explain_refuse_an_unwritable_run_before_reading_the_images(shapes_run, shapes_dir, tmp_path):
    import subprocess

    run = shutil.copytree(shapes_run.path, tmp_path / "run")
    image = sorted(shapes_dir.rglob("*.jpg"))[0]
    # Immutable (root passes permission bits): the default output folder cannot be made in it
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        for command in (["evaluate", str(run), str(shapes_dir), "-q"], ["explain", str(run), str(image)]):
            line = one_error_line(runner.invoke(app, command))
            assert line == f"error: cannot write into {run} (permission denied); choose another -o", line
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
