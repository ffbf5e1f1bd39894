"""Export and evaluation folders: a second writer is refused naming the first, and a write
the system refuses leaves nothing under the final name."""

from __future__ import annotations

import resource

import pytest

from tests.reliability.test_locks import holder
from tests.reliability.test_untrusted import small_run
from transferkit.errors import ExportError, RunError
from transferkit.locks import work_dir_for


def test_an_export_or_evaluation_folder_being_written_is_refused_naming_its_writer(tmp_path):
    from transferkit.evaluation.evaluate import check_output_folder
    from transferkit.export.exporter import export_run

    run = small_run(tmp_path / "run")
    target = tmp_path / "out"
    process = holder(work_dir_for(target), "export")
    try:
        for force in (False, True):
            with pytest.raises(ExportError, match=f"out is being written by pid {process.pid} on "):
                export_run(run, "keras", target, force=force)
            with pytest.raises(RunError, match=f"out is being written by pid {process.pid} on "):
                check_output_folder(target, force)
        assert not target.exists()
    finally:
        process.kill()
        process.wait()


@pytest.fixture()
def file_size_limit():
    """A soft RLIMIT_FSIZE of 64 kB on this process for the test (Python ignores SIGXFSZ: a
    write past it fails with EFBIG), the old limit put back after."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, old)


def test_a_folder_that_cannot_be_written_is_one_error_naming_it_and_leaves_nothing(tmp_path, file_size_limit):
    from transferkit import runs
    from transferkit.locks import publishing

    def contents(folder):
        (folder / "small.txt").write_text("fits")
        (folder / "model.keras").write_bytes(bytes(200 * 1024))

    with pytest.raises(RunError) as error:
        runs.save_run(tmp_path / "run", contents)
    assert str(error.value) == (f"could not write run folder {tmp_path / 'run'}: the file size limit was reached "
                                "(ulimit -f); the folder was not written")
    with pytest.raises(OSError), publishing(tmp_path / "eval", "evaluation") as staging:
        contents(staging)
    assert list(tmp_path.iterdir()) == []
