"""A real PostgreSQL server for the shared-study tests: a throwaway cluster (initdb) in a
temporary folder, on a free port of 127.0.0.1 and a socket in that folder only, stopped and
removed after the session."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def postgres_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's ``postgresql`` package puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql+psycopg://postgres@127.0.0.1:PORT/transferkit``: an empty database on a
    server of its own (fsync off: nothing here needs to survive a crash)."""
    pytest.importorskip("psycopg", reason="the tune extra's PostgreSQL driver (psycopg) is not installed")
    programs = {name: postgres_program(name) for name in ("initdb", "pg_ctl", "createdb")}
    if not all(programs.values()):
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="tk-postgres-"))
    # initdb refuses to run as root: the cluster belongs to the postgres system user then.
    as_owner = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*command, check=True):
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)

    try:
        run(*as_owner, programs["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
            "-E", "UTF8")
        options = (f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        run(*as_owner, programs["pg_ctl"], "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o", options,
            "start")
    except subprocess.CalledProcessError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"the test PostgreSQL server did not start: {error.stderr or error.stdout}") from error
    try:
        run(programs["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "transferkit")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/transferkit"
    finally:
        run(*as_owner, programs["pg_ctl"], "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)
