"""Running the application: a socket bound here, uvicorn in this process or in worker
processes, and a graceful stop.

The socket is bound before the run is loaded, so a port in use is told at once, and
``--port 0`` gets a free port whose number is announced. SIGTERM or SIGINT (Ctrl-C) stops
accepting connections, lets the requests in flight finish (up to ``grace`` seconds, default
``SHUTDOWN_GRACE_S``; those still running then are answered 503), stops the engine's thread
and returns: the command exits 0. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from transferkit.errors import ServeError
from transferkit.serve.service import ServeSettings

log = logging.getLogger("transferkit")

# How long requests in flight may take to finish after SIGTERM / Ctrl-C.
SHUTDOWN_GRACE_S = 60
# How long uvicorn's supervisor waits for a worker process to answer its ping before it kills
# the worker and starts another (gunicorn's --timeout default). A worker answers from a thread
# of its own, loading included: within a second here on a busy 2-core machine. The supervisor
# handles SIGTERM / Ctrl-C only between pings, so a hung worker delays a stop by up to this
# (then the grace and this again, before ``supervise`` kills it).
WORKER_TIMEOUT_S = 30.0
# How long a worker started by SIGHUP (the restart of every worker, one at a time) may take to
# load the run and serve, before the restart stops there and the old worker goes on serving.
WORKER_READY_S = 300.0

INSTALL = "pip install 'transferkit[serve]'"


@dataclass(frozen=True)
class ServeResult:
    """How a server ended.

    Attributes:
        url: where it listened.
        stopped_by: the signal's name ("SIGTERM", "SIGINT"), or None.
        images_answered: images classified (in this process; None with worker processes).
    """

    url: str
    stopped_by: str | None
    images_answered: int | None


def check_installed() -> None:
    """Raise ``ServeError`` with the install command when the ``serve`` extra is missing."""
    import importlib.util

    missing = [name for module, name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("multipart", "python-multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ServeError(f"transferkit serve needs {', '.join(missing)} (the serve extra); run: {INSTALL}")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one).

    Raises:
        ServeError: the address cannot be listened on (in use, not this machine's, not allowed).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise ServeError(f"--host {host}: {getattr(error, 'strerror', None) or error}; "
                         "give an address of this machine (127.0.0.1, 0.0.0.0, ::1)") from error
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port "
                         "(--port 0 picks a free one) or stop what is using it") from error
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = True, announce: Callable[[str, object], None] | None = None,
          grace: float = SHUTDOWN_GRACE_S, worker_timeout: float = WORKER_TIMEOUT_S) -> ServeResult:
    """Serve a run until SIGTERM or Ctrl-C.

    Args:
        settings: what to serve (``ServeSettings``).
        host: the address to listen on; default "127.0.0.1" (this machine only).
        port: the port; default 8000 (0: a free one).
        workers: processes answering, each with the model loaded; default 1 (one process,
            whose engine thread batches all requests).
        access_log: log one line per request (uvicorn's); default True.
        announce: called with the URL and the loaded ``Service`` once the socket listens
            and the run is loaded, before requests are answered; default None.
        grace: seconds the requests in flight may take to finish once SIGTERM or Ctrl-C
            came (those still running then are answered 503); default ``SHUTDOWN_GRACE_S``.
        worker_timeout: with ``workers`` above 1, seconds a worker may leave the supervisor's
            ping unanswered before it is killed and replaced; default ``WORKER_TIMEOUT_S``.

    Returns:
        A ``ServeResult``.

    Raises:
        ServeError: the serve extra is missing, or the address cannot be listened on.
        RunError, EngineError: the run cannot be loaded, or its engine built.
    """
    import uvicorn

    from transferkit.serve.app import create_app
    from transferkit.serve.service import SNAPSHOT_VARIABLE, load_service, snapshot_folder, take_snapshot

    check_installed()
    if workers < 1:
        raise ServeError(f"--workers must be at least 1, got {workers}")
    if not 0 <= grace < float("inf"):
        raise ServeError(f"--grace must be 0 or more seconds, got {grace:g}")
    if not 1 <= worker_timeout < float("inf"):  # below, workers answering in a second are replaced
        raise ServeError(f"--worker-timeout must be 1 second or more, got {worker_timeout:g}")
    sock = bind(host, port)
    # Worker processes load a snapshot of the run, not the run: one that uvicorn starts again
    # (after a crash) loads the model the others answer with, even if the run was replaced
    # or removed meanwhile. It is removed when the server stops (or, killed, by the next).
    snapshots = None
    try:
        if workers > 1:
            snapshots = snapshot_folder()
        snapshot = take_snapshot(settings.run, snapshots) if snapshots is not None else None
        # Loaded here in any case: a run that cannot be loaded is told once, as one line, and
        # the engine cache is filled before worker processes look for it.
        service = load_service(settings, snapshot)
        url = url_of(sock)
        if announce is not None:
            announce(url, service)
        common = dict(log_level="info" if access_log else "warning", access_log=access_log,
                      timeout_graceful_shutdown=grace, server_header=False)
        if workers == 1:
            server = uvicorn.Server(uvicorn.Config(create_app(service), **common))
            stopped_by = run_until_signal(lambda: server.run(sockets=[sock]), server)
            return ServeResult(url, stopped_by, service.answered)
        del service
        os.environ["TRANSFERKIT_SERVE"] = settings.to_json()
        os.environ[SNAPSHOT_VARIABLE] = str(snapshot)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        common["timeout_worker_healthcheck"] = worker_timeout
        config = uvicorn.Config("transferkit.serve.app:app_from_environment", factory=True, workers=workers,
                                **common)
        # The supervisor turns SIGTERM / SIGINT into a graceful stop of every worker, then returns.
        supervise(config, sock, stop_wait=grace + worker_timeout)
        return ServeResult(url, None, None)
    finally:
        sock.close()
        if snapshots is not None:
            shutil.rmtree(snapshots, ignore_errors=True)


def supervise(config, sock: socket.socket, stop_wait: float) -> None:
    """Run uvicorn's supervisor of worker processes until SIGTERM or SIGINT, as uvicorn does,
    except in how it waits for its workers to end after passing the signal on: a worker still
    running ``stop_wait`` seconds later is hung (uvicorn would wait for it for ever) and is
    killed. (A Ctrl-C in a terminal reaches the workers too: a second one stops each at once.)
    And SIGHUP's restart (uvicorn's, one worker at a time) gives each new worker
    ``WORKER_READY_S`` to load the run, where uvicorn gives it the ping's timeout, and each
    old one ``stop_wait`` to end, where uvicorn waits for ever. Built on uvicorn 0.51 and
    later (``Process.exitcode``, the supervisor made from the config and sockets alone)."""
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    def end(process, deadline: float) -> None:
        """Wait for a worker sent SIGTERM to end, until ``deadline``; then kill it."""
        while process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.exitcode is None:
            log.warning(f"worker process {process.pid} killed: still running {stop_wait:g} s after the stop")
            process.kill()
        process.join()

    class Supervisor(Multiprocess):
        def restart_all(self) -> None:
            for index, old in enumerate(self.processes):
                if self.should_exit.is_set():
                    return
                new = Process(self.config, self.sockets)
                new.start()
                if not new.wait_until_ready(WORKER_READY_S, self.should_exit):
                    new.kill()
                    new.join()
                    if not self.should_exit.is_set():
                        log.warning(f"worker process {new.pid} did not load the run in {WORKER_READY_S:g} s; "
                                    f"worker {old.pid} goes on serving, and the restart stops there")
                    return
                old.terminate()
                end(old, time.monotonic() + stop_wait)
                self.processes[index] = new

        def join_all(self) -> None:
            deadline = time.monotonic() + stop_wait
            for process in self.processes:
                end(process, deadline)

    Supervisor(config, sockets=[sock]).run()


def run_until_signal(run: Callable[[], None], server) -> str | None:
    """Run uvicorn's server with SIGTERM and SIGINT ending it gracefully and nothing more.

    uvicorn handles both while it serves, then raises the signal again once it has shut
    down, for the handler that was there before; that handler is this one, which only
    records it, so the process goes on to exit 0. A signal that comes before uvicorn has
    started makes it stop as soon as it has.

    Returns:
        The name of the signal that stopped it, or None.
    """
    received: list[str] = []

    def record(number, frame):
        received.append(signal.Signals(number).name)
        server.should_exit = True

    previous = {number: signal.signal(number, record) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return received[0] if received else None
