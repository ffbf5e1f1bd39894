import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from transferkit.errors import DataError, RunError
from transferkit.inference.predict import predict_folder, write_predictions
from transferkit.runs import load_run


@pytest.fixture(scope="module")
def run_dir(binary_run):
    return binary_run.path


@pytest.fixture()
def to_sort(tmp_path):
    folder = tmp_path / "to sort"
    (folder / "nested" / "déjà vu").mkdir(parents=True)
    Image.new("RGB", (50, 30), (200, 10, 10)).save(folder / "a.png")
    Image.new("L", (20, 20), 90).save(folder / "nested" / "déjà vu" / "b c.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG nope")
    (folder / "readme.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"litter")
    return folder


def test_every_image_gets_a_row_and_bad_files_are_skipped(run_dir, to_sort):
    result = predict_folder(load_run(run_dir), to_sort, top_k=2)
    names = [row.file.name for row in result.rows]
    assert names == ["a.png", "b c.jpg"]
    for row in result.rows:
        assert row.label in ("circle", "square")
        assert [name for name, _ in row.top_k][0] == row.label
        assert sum(p for _, p in row.top_k) == pytest.approx(1.0, abs=1e-5)
        assert row.confidence >= 0.5
    assert [path.name for path, _ in result.skipped] == ["broken.png"]
    assert [path.name for path in result.ignored] == ["readme.txt"]


def test_batches_give_the_same_answers_as_one_pass(run_dir, to_sort):
    run = load_run(run_dir)
    one = predict_folder(run, to_sort, batch_size=1).rows
    many = predict_folder(run, to_sort, batch_size=64).rows
    assert [(r.file, r.label) for r in one] == [(r.file, r.label) for r in many]
    assert [r.confidence for r in one] == pytest.approx([r.confidence for r in many], abs=1e-5)


def test_csv_and_json_writers(run_dir, to_sort, tmp_path):
    result = predict_folder(run_dir, to_sort, top_k=2)
    with open(write_predictions(result, tmp_path / "p.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [str(row.file) for row in result.rows]
    assert rows[0]["top_k"].count(":") == 2
    payload = json.loads(write_predictions(result, tmp_path / "p.json").read_text(encoding="utf-8"))
    assert payload["predictions"][1]["file"].endswith("b c.jpg")
    assert [item["file"].rsplit("/", 1)[-1] for item in payload["skipped"]] == ["broken.png"]
    assert [item.rsplit("/", 1)[-1] for item in payload["ignored"]] == ["readme.txt"]
    with pytest.raises(DataError, match=".csv or .json"):
        write_predictions(result, tmp_path / "p.xlsx")


def test_a_class_name_holding_a_csv_separator_is_warned_about_once(tmp_path, caplog):
    from transferkit.inference.predict import Prediction, PredictionResult

    rows = [Prediction(f"{i}.jpg", "a;b", 0.6, (("a;b", 0.6), ("x:y", 0.4))) for i in range(3)]
    with caplog.at_level("WARNING", logger="transferkit"):
        write_predictions(PredictionResult(rows, []), tmp_path / "p.csv")
    assert [record.getMessage() for record in caplog.records] == [
        "class 'a;b' holds ';', which the CSV's top_k column puts between classes: read that column from a .json "
        "output instead (or rename the class folder)"]  # ':' is not: a name is what precedes its last ':'
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as handle:
        assert next(csv.DictReader(handle))["top_k"] == "a;b:0.600000;x:y:0.400000"


def test_not_a_run_missing_labels_and_mismatched_model(run_dir, tmp_path):
    import shutil

    with pytest.raises(RunError, match="not a transferkit run"):
        load_run(tmp_path)
    broken = tmp_path / "copy"
    shutil.copytree(run_dir, broken)
    (broken / "labels.json").unlink()
    with pytest.raises(RunError, match="labels.json is missing"):
        load_run(broken)
    shutil.copy(run_dir / "labels.json", broken / "labels.json")
    labels = json.loads((broken / "labels.json").read_text())
    labels["class_names"] = ["a", "b", "c"]
    (broken / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(RunError, match="1 output unit"):
        load_run(broken)


def test_a_folder_with_no_images_is_an_error(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        predict_folder(run_dir, tmp_path / "empty")


def test_an_engine_or_precision_outside_the_choices_is_an_engine_error(run_dir, to_sort):
    from transferkit.errors import EngineError
    from transferkit.evaluation.evaluate import evaluate_folder

    for call in (predict_folder, evaluate_folder):
        with pytest.raises(EngineError, match="engine 'tpu': choose auto, keras, openvino"):
            call(run_dir, to_sort, engine="tpu")
        with pytest.raises(EngineError, match="precision 'int4': choose auto, float32, bfloat16, float16, int8"):
            call(run_dir, to_sort, precision="int4")


def test_openvino_and_keras_engines_agree_and_the_run_folder_is_untouched(run_dir, to_sort):
    before = sorted((path.relative_to(run_dir), path.stat().st_mtime_ns) for path in run_dir.rglob("*"))
    run = load_run(run_dir)
    keras_rows = predict_folder(run, to_sort, engine="keras")
    openvino_rows = predict_folder(run, to_sort, engine="openvino")
    assert keras_rows.engine == "keras" and openvino_rows.engine == "openvino"
    assert [r.file for r in keras_rows.rows] == [r.file for r in openvino_rows.rows]
    confidences = [r.confidence for r in keras_rows.rows]
    assert [r.confidence for r in openvino_rows.rows] == pytest.approx(confidences, abs=0.05)
    after = sorted((path.relative_to(run_dir), path.stat().st_mtime_ns) for path in run_dir.rglob("*"))
    assert before == after


def test_float32_precision_makes_openvino_match_keras_closely(run_dir, to_sort):
    run = load_run(run_dir)
    from transferkit.inference.engines import make_engine
    from transferkit.inference.openvino import float32_clone

    exact = predict_folder(run, to_sort, engine="openvino", precision="float32")
    # The run trained in mixed bfloat16 on a CPU with fast bfloat16 and in float32 elsewhere;
    # either way its float32 twin is the exact reference.
    twin = make_engine(float32_clone(run.model), "keras", input_shape=(run.image_size, run.image_size, 3))
    reference = predict_folder(run, to_sort, engine=twin)
    assert exact.engine == "openvino"
    assert [r.label for r in exact.rows] == [r.label for r in reference.rows]
    assert [r.confidence for r in exact.rows] == pytest.approx([r.confidence for r in reference.rows], abs=1e-4)


def near_ties_of_several_batches(run_dir, tmp_path, monkeypatch):
    """predict_folder over 14 images in batches of 3 with a ChainedEngine whose every third
    image is declared a near tie; returns (run, folder, result, the first looks' outputs,
    the second looks' outputs, the progress calls, progress at each second look)."""
    import numpy as np

    import transferkit.runtime
    from transferkit.inference.engines import ChainedEngine, inference_engine
    from transferkit.inference.openvino import engine_cache_dir

    # "auto" as on a CPU with fast bfloat16, whatever this one has (a CPU without it
    # computes the bf16 hint in float32: the gathering is the same)
    monkeypatch.setattr(transferkit.runtime, "resolve_precision", lambda precision: ("mixed_bfloat16", "test"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(14):
        pixels = np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 60, (40, 40, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{index:02d}.jpg")
    run = load_run(run_dir)
    engine = inference_engine(run.model, "openvino", run.image_size, cache_dir=engine_cache_dir(run_dir),
                              precision="auto", input_dtype="uint8")
    assert isinstance(engine, ChainedEngine)
    # Which images are near ties is the engine's business (tested with it); here every
    # third image, one per batch of 3, is declared one, and what each look returns is kept.
    first_looks, second_looks = [], []
    first_look, second_look = engine.first_look, engine.second_look

    def declared_first_look(images):
        outputs, _ = first_look(images)
        start = sum(len(seen) for seen in first_looks)
        first_looks.append(np.array(outputs))
        return outputs, np.asarray([i for i in range(len(images)) if (start + i) % 3 == 1], dtype="int64")

    progress, progress_at_second_looks = [], []

    def recorded_second_look(images):
        progress_at_second_looks.append(progress[-1])
        second_looks.append(second_look(images))
        return second_looks[-1]

    monkeypatch.setattr(engine, "first_look", declared_first_look)
    monkeypatch.setattr(engine, "second_look", recorded_second_look)
    result = predict_folder(run, folder, batch_size=3, engine=engine, top_k=len(run.class_names),
                            progress=lambda done, total: progress.append((done, total)))
    assert engine.refined == 5
    return run, folder, result, first_looks, second_looks, progress, progress_at_second_looks


def test_near_ties_from_several_batches_are_looked_at_together(run_dir, tmp_path, monkeypatch):
    """With a 16-bit engine that computes near ties again, predict gathers the near ties of
    several batches for one float32 pass and puts each result back in its own row."""
    import numpy as np

    run, folder, result, first_looks, second_looks, progress, progress_at_second_looks = (
        near_ties_of_several_batches(run_dir, tmp_path, monkeypatch))
    # 5 near ties in 5 batches: one float32 pass once 3 are waiting, one for the last 2
    assert [len(look) for look in second_looks] == [3, 2]
    # Progress counts a near tie once its float32 pass is done (6 = 3 batches less their 3
    # waiting near ties): the bar reaches the end only after the last pass.
    assert progress_at_second_looks == [(6, 14), (12, 14)] and progress[-1] == (14, 14)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    expected = np.concatenate(first_looks)
    expected[1::3] = np.concatenate(second_looks)
    if expected.shape[1] == 1:
        expected = np.concatenate([1 - expected, expected], axis=1)
    assert [row.file for row in result.rows] == sorted(folder.iterdir())
    got = np.asarray([[dict(row.top_k)[name] for name in run.class_names] for row in result.rows])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.needs_fast_bfloat16
def test_near_ties_get_float32_outputs_not_their_16_bit_ones_on_a_fast_bfloat16_cpu(run_dir, tmp_path, monkeypatch):
    """Where the CPU computes bfloat16, the float32 pass changes the near ties' rows: they
    are not the 16-bit ones (elsewhere the first look is float32 already)."""
    import numpy as np

    _, _, _, first_looks, second_looks, _, _ = near_ties_of_several_batches(run_dir, tmp_path, monkeypatch)
    assert not np.allclose(np.concatenate(first_looks)[1::3], np.concatenate(second_looks), rtol=0, atol=1e-7)


def test_nothing_readable_is_an_error_not_an_empty_result(run_dir, tmp_path):
    folder = tmp_path / "all bad"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"all 2 image files under .*all bad are unreadable \(e\.g\. .*empty\.jpg"):
        predict_folder(run_dir, folder)
    with pytest.raises(DataError, match=r"empty\.jpg: not a readable image .*; pass a readable image file"):
        predict_folder(run_dir, folder / "empty.jpg")
    (folder / "text.png").unlink()
    with pytest.raises(DataError, match=r"the only image file under .*all bad is unreadable \(.*empty\.jpg"):
        predict_folder(run_dir, folder)


def test_check_output_refuses_what_cannot_be_written_and_creates_nothing(tmp_path):
    from transferkit.inference.predict import check_output

    assert check_output(tmp_path / "new" / "deeper" / "p.json") == tmp_path / "new" / "deeper" / "p.json"
    assert not (tmp_path / "new").exists()  # only checked: the folder is made once predictions exist
    with pytest.raises(DataError, match="use a .csv or .json"):
        check_output(tmp_path / "p.xlsx")
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(DataError, match=r"afile\.txt is a file, not a folder"):
        check_output(tmp_path / "afile.txt" / "x.csv")
    with pytest.raises(DataError, match=r"afile\.txt is a file, not a folder"):
        check_output(tmp_path / "afile.txt" / "sub" / "x.csv")
    (tmp_path / "out.csv").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        check_output(tmp_path / "out.csv")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile.txt", "out.csv"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_output_tries_the_folder_even_where_permissions_say_yes():
    from transferkit.inference.predict import check_output

    # Root may write anywhere by the permission bits, yet no file can be made in /proc.
    with pytest.raises(DataError, match="cannot write in /proc"):
        check_output("/proc/x.csv")


def test_keras_engine_in_float32_runs_the_float32_clone(bfloat16_run, to_sort):
    from transferkit.inference.engines import make_engine
    from transferkit.inference.openvino import float32_clone

    run = bfloat16_run
    twin = make_engine(float32_clone(run.model), "keras")
    reference = [r.confidence for r in predict_folder(run, to_sort, engine=twin).rows]
    exact = predict_folder(run, to_sort, engine="keras", precision="float32")
    assert exact.engine == "keras"
    # the same float32 graph as the reference: equal but for float32 rounding
    assert [r.confidence for r in exact.rows] == pytest.approx(reference, abs=1e-6)
    # the model's own bfloat16 is not float32, and the comparison above can tell them apart
    # (seen: 6e-6 apart with TensorFlow's Eigen kernels, as on CPUs without AVX-512)
    own = [r.confidence for r in predict_folder(run, to_sort, engine="keras", precision="bfloat16").rows]
    assert own != pytest.approx(reference, abs=1e-6)


def test_keras_engine_says_when_it_keeps_the_model_precision(bfloat16_run, to_sort):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transferkit")
    logger.addHandler(handler)
    try:
        predict_folder(bfloat16_run, to_sort, engine="keras", precision="bfloat16")
        assert not [r for r in records if "Keras engine" in r.getMessage()]
        predict_folder(bfloat16_run, to_sort, engine="keras", precision="float16")
    finally:
        logger.removeHandler(handler)
    (notice,) = [r for r in records if "Keras engine" in r.getMessage()]
    assert notice.levelno == logging.WARNING  # shown by the CLI, not only in debug logs
    assert "own bfloat16 precision, not float16" in notice.getMessage()
    assert "\n" not in notice.getMessage()


def test_engine_caches_of_deleted_runs_are_removed(tmp_path, monkeypatch):
    """Each predicted run leaves ~100 MB of converted networks: once its run folder is
    gone, the next prediction removes them; other folders are left alone."""
    import shutil

    from transferkit.inference.openvino import claim_engine_cache

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name in ("kept", "deleted", "model-file"):
        runs[name] = tmp_path / "runs" / name
        runs[name].mkdir(parents=True)
        (runs[name] / "labels.json").write_text("{}")
    caches = {name: claim_engine_cache(path) for name, path in runs.items()}
    caches["model-file"] = claim_engine_cache(runs["model-file"] / "model.keras")  # a run given as its .keras file
    unrecorded = tmp_path / "cache" / "engine" / "made-elsewhere"
    unrecorded.mkdir()
    for cache in caches.values():
        (cache / "openvino-32px").mkdir(exist_ok=True)
    shutil.rmtree(runs["deleted"])
    assert claim_engine_cache(runs["kept"]) == caches["kept"]
    assert not caches["deleted"].exists()
    assert caches["kept"].is_dir() and caches["model-file"].is_dir() and unrecorded.is_dir()
    assert (caches["kept"] / "openvino-32px").is_dir()


def test_a_warm_predict_neither_converts_nor_compiles_again(run_dir, to_sort, tmp_path, monkeypatch):
    """The second predict of a run reads its converted networks and loads their compiled
    blobs from the run's engine cache folder (OpenVINO's CACHE_DIR there)."""
    pytest.importorskip("openvino")
    from transferkit.inference import openvino as openvino_module

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    core = openvino_module.openvino_core()
    compiled = []

    class RecordingCore:
        def compile_model(self, network, device, config):
            compiled.append((config.get("CACHE_DIR"), core.compile_model(network, device, config)))
            return compiled[-1][1]

        def __getattr__(self, name):
            return getattr(core, name)

    monkeypatch.setattr(openvino_module, "openvino_core", lambda: RecordingCore())
    cold = predict_folder(run_dir, to_sort, engine="openvino")
    cache = openvino_module.engine_cache_dir(run_dir) / "compiled"
    assert compiled and all(folder == str(cache) for folder, _ in compiled)
    assert list(cache.glob("*.blob"))
    assert not any(model.get_property("LOADED_FROM_CACHE") for _, model in compiled)
    compiled.clear()

    def no_export(*args, **kwargs):
        raise AssertionError("the cached network should have been reused")

    monkeypatch.setattr(openvino_module, "export_network", no_export)
    warm = predict_folder(run_dir, to_sort, engine="openvino")
    assert compiled and all(model.get_property("LOADED_FROM_CACHE") for _, model in compiled)
    assert [r.label for r in warm.rows] == [r.label for r in cold.rows]
