"""MLflow tracking without a training: where the URI comes from, MLflow missing, a server that
cannot be reached and a store that fails mid-run (each one warning line, the epochs going on).
A real ``finetune --mlflow`` read back with MLflow's client: tests/cli/test_cli.py; a tune
study's nested runs: tests/tuning/test_search.py."""

from __future__ import annotations

import logging
import socket
import sys

import pytest

import transferkit
from transferkit.training import tracking


def test_tracking_uri_comes_from_the_recipe_then_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.tracking_uri("") == "sqlite:///from-env.db"
    assert tracking.tracking_uri("http://tracker:5000") == "http://tracker:5000"
    assert tracking.tracking_uri("off") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri("") is None
    assert tracking.public_uri("https://me:secret@tracker:5000/") == "https://tracker:5000/"


def test_without_mlflow_a_named_uri_is_an_error_and_the_environment_alone_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(transferkit.TransferkitError, match=r"pip install 'transferkit\[mlflow\]'"):
        tracking.require_mlflow("sqlite:///runs.db")
    tracking.require_mlflow("")  # nothing named: nothing needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert tracking.check_tracking("") is None
    assert [record.getMessage() for record in caplog.records] == [
        "MLFLOW_TRACKING_URI is set but MLflow is not installed, so this job is not tracked; run: "
        + tracking.INSTALL]


def test_a_tracking_server_that_cannot_be_reached_is_one_warning(caplog):
    with socket.socket() as probe:  # a port held and not listened on: refused, whoever else runs
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            tracker = tracking.Tracker.open(f"http://127.0.0.1:{port}", run_name="run", params={"a": "1"})
    assert tracker is None
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    message = record.getMessage()
    assert f"MLflow tracking at http://127.0.0.1:{port} is off" in message and "training goes on" in message
    assert "\n" not in message


def test_a_file_store_mlflow_refuses_is_one_warning_that_says_what_to_do(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        tracker = tracking.Tracker.open((tmp_path / "mlruns").as_uri(), run_name="run", params={"a": "1"})
    assert tracker is None  # MLflow 3.18 on (the mlflow extra's range) refuses it
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert "unless MLFLOW_ALLOW_FILE_STORE=true is set; track to sqlite:///mlflow.db instead" in record.getMessage()


def test_a_store_failing_mid_run_is_one_warning_and_the_epochs_go_on(mlflow_store, tmp_path, caplog):
    uri = mlflow_store(tmp_path)
    tracker = tracking.Tracker.open(uri, run_name="run", params={"a": "1"})
    logger = tracker.epoch_logger()
    logger.on_epoch_end(0, {"loss": 1.0, "learning_rate": 1e-3})
    with open(tmp_path / "mlflow.db", "r+b") as database:  # the store breaks under the run
        database.write(b"not a database any more" * 100)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        for epoch in (1, 2):
            logger.on_epoch_end(epoch, {"loss": 0.5, "learning_rate": 1e-3})
        tracker.end()
    assert tracker.failed and logger.epoch == 3
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert "stopped" in record.getMessage() and "training goes on" in record.getMessage()


# finetune and tune as tiny as they go: without the scheme check they would train (briefly).
TINY_FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--set", "precision=\"float32\"", "--image-size", "32",
              "--batch-size", "8", "--head-epochs", "1", "--fine-epochs", "0", "--set", "head.units=[16]", "--quiet"]


@pytest.mark.parametrize("source", ["flag", "tune flag", "recipe key", "environment"])
def test_an_unsupported_uri_scheme_is_a_usage_error_before_any_work(source, shapes_dir, tmp_path, monkeypatch):
    """``sqlit:///`` (a typo) went on untracked, exit 0, with a warning cut off mid-word."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from typer.testing import CliRunner

    from transferkit.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlit:///{tmp_path / 'store' / 'mlflow.db'}"
    command = ["tune" if source == "tune flag" else "finetune", str(shapes_dir), *TINY_FLAGS,
               "-o", str(tmp_path / "out")]
    if source == "tune flag":
        command += ["--trials", "1"]
    if source in ("flag", "tune flag"):
        command += ["--mlflow", uri]
    elif source == "recipe key":
        (tmp_path / "recipe.toml").write_text(f'mlflow = "{uri}"\n')
        command += ["--recipe", str(tmp_path / "recipe.toml")]
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    named = "MLFLOW_TRACKING_URI=" if source == "environment" else "--mlflow"
    assert line.startswith(f"error: {named}") and uri in line, line
    assert "scheme 'sqlit' (did you mean sqlite?)" in line and "http, https" in line and "sqlite, mssql" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == (["recipe.toml"] if source == "recipe key" else [])


def test_the_scheme_check_asks_mlflows_own_registry_of_tracking_stores():
    """It reads an MLflow internal (the registry MlflowClient builds its store from): this
    fails when a release moves it, where the check would quietly pass every scheme."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    for uri in ("sqlite:///mlflow.db", "postgresql+psycopg://user@host/db", "http://host:5000",
                "https://host", "databricks", "file:///tmp/mlruns"):
        assert tracking._unsupported_scheme(uri) is None, uri
    for uri in ("sqlit:///mlflow.db", "sqlitex:///mlflow.db", "postgres://host/db", "htp://host:5000"):
        assert "MLflow has no tracking store for the URI scheme" in tracking._unsupported_scheme(uri), uri


def test_a_sqlite_store_in_a_missing_folder_is_created_with_its_folders_and_nothing_outside(tmp_path, caplog):
    """What docs/tracking.md says of a database whose folder does not exist (MLflow creates
    it): its folders, the database and, once artifacts are logged, mlartifacts/ beside it;
    a folder that cannot be created is the one warning."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    database = tmp_path / "new" / "deeper" / "mlflow.db"
    tracker = tracking.Tracker.open(f"sqlite:///{database}", run_name="run", params={"a": "1"})
    assert tracker is not None and database.is_file()
    (tmp_path / "note.txt").write_text("an artifact")
    tracker.log_files([tmp_path / "note.txt"])
    tracker.end()
    assert not tracker.failed
    assert sorted(path.name for path in database.parent.iterdir()) == ["mlartifacts", "mlflow.db"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new", "note.txt"]
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        assert tracking.Tracker.open(f"sqlite:///{tmp_path / 'note.txt' / 'mlflow.db'}", run_name="run") is None
    [record] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert "is off for this job" in record.getMessage() and "training goes on" in record.getMessage()
