"""Running the app: ``serve_forever`` (the CLI) and ``ServerThread`` (tests and benchmarks: uvicorn in
a background thread on 127.0.0.1 and a free port).

Several worker processes (``ipshield serve --workers N``): uvicorn starts each worker from an import
string, so the settings travel as JSON in the environment variable ``IPSHIELD_SERVE_SETTINGS``
(paths and limits, no secrets) and each worker builds its app with :func:`app_from_env`.

:func:`check_database` is the CLI's look at a SQLite file before anything opens it: ``serve``
refuses a missing file unless told to create it (an empty database refuses every key), and a write
command refuses a file or folder it may not write, with the fix instead of a database error."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ipshield.errors import IPShieldError

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as srv: httpx.get(srv.url + "/health")``. Loopback only."""

    def __init__(self, app, port: int | None = None, log_config=None, access_log: bool = True):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.app = app
        config = uvicorn.Config(app, host=LOOPBACK, port=self.port, log_config=log_config, access_log=access_log,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive() or time.time() - t0 > timeout:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


SETTINGS_ENV = "IPSHIELD_SERVE_SETTINGS"  # ServeSettings as JSON, for the workers of `serve --workers N`
LOG_LEVEL_ENV = "IPSHIELD_SERVE_LOG_LEVEL"
APP_FACTORY = "ipshield.serve.server:app_from_env"
WORKER_HEALTHCHECK_S = 15  # seconds a worker may take to answer uvicorn's supervisor (default 5: too short on a busy machine)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


# --------------------------------------------------------------------------- the database file
def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:///rel.db``, ``sqlite:////abs.db``, a ``file:`` URI with
    ``uri=true``); None for in-memory SQLite, other databases and URLs that do not parse."""
    if not url.startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception:  # the engine reports a bad URL itself
        return None
    if u.get_backend_name() != "sqlite":
        return None
    name = u.database or ""
    if str(u.query.get("uri", "")).lower() in ("true", "1") and name.startswith("file:"):
        if str(u.query.get("mode", "")).lower() == "memory":
            return None
        name = name[len("file:"):].split("?", 1)[0]
        if name.startswith("//"):  # file://HOST/path (HOST empty or localhost)
            name = "/" + name[2:].partition("/")[2]
    if name in ("", ":memory:"):
        return None
    return Path(name)


def check_database(url: str, *, create: bool, write: bool = True,
                   missing_fix: str = "run `ipshield keys create --db URL --customer NAME` first") -> None:
    """For a SQLite file URL: the file exists (or ``create`` and its folder exists), and with
    ``write`` the file and its folder (SQLite writes its -wal and -shm files there) are writable.
    Raises ``IPShieldError`` with the fix; never echoes the URL (it may hold a password)."""
    path = sqlite_file(url)
    if path is None:
        return
    folder = path.absolute().parent
    if path.exists():
        if not path.is_file():
            raise IPShieldError(f"the database {path} is not a file", "give --db sqlite:///FILE.db with the path of a SQLite file")
        if write and not os.access(path, os.R_OK | os.W_OK):
            raise IPShieldError(f"the database {path} is read-only: this user may not write it",
                                "make it writable (chmod u+w FILE, or run as its owner) or point --db at a copy you may write")
        if write and not os.access(folder, os.W_OK | os.X_OK):
            raise IPShieldError(f"the folder {folder} of the database is not writable: SQLite writes its journal files "
                                "(-wal, -shm) next to the database",
                                "make the folder writable (chmod u+w FOLDER) or move the database to a folder you may write")
        return
    if not create:
        raise IPShieldError(f"the database {path} does not exist", missing_fix)
    if not folder.is_dir():
        raise IPShieldError(f"the folder {folder} of the database does not exist", "create the folder first or fix the --db path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise IPShieldError(f"cannot create the database {path}: the folder {folder} is not writable",
                            "choose a --db path in a folder you may write")


# --------------------------------------------------------------------------- running the service
def setup_logging(log_level: str) -> None:
    """The root logger at ``log_level`` (uvicorn's names; trace = 5) for the service's own messages."""
    level = logging.getLevelName(log_level.upper())
    logging.basicConfig(level=level if isinstance(level, int) else 5, format="%(levelname)s %(name)s: %(message)s")


def check_run_options(port: int, workers: int, log_level: str) -> str:
    """``IPShieldError`` unless 1 <= port <= 65535, workers >= 1 and log_level is one of uvicorn's
    (any case); returns the log level in lower case."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise IPShieldError(f"--port {port} is out of range", "give --port a TCP port between 1 and 65535, e.g. --port 8000")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise IPShieldError(f"--workers {workers} is not a number of processes", "give --workers 1 (the default) or more")
    level = str(log_level).strip().lower()
    if level not in LOG_LEVELS:
        raise IPShieldError(f"unknown --log-level {log_level!r}", f"use one of {', '.join(LOG_LEVELS)}, e.g. --log-level info")
    return level


def app_from_env():
    """The ASGI app of one worker of ``serve --workers N`` (uvicorn's ``factory=True``): the
    settings come from ``$IPSHIELD_SERVE_SETTINGS`` (JSON of ServeSettings). A worker that cannot
    build its app logs one error (no traceback unless ``IPSHIELD_DEBUG``) and exits with uvicorn's
    startup-failure status, which stops the whole service."""
    from uvicorn.config import STARTUP_FAILURE

    log = logging.getLogger("uvicorn.error")
    try:
        from ipshield.serve.app import create_app
        from ipshield.serve.images import install_pil_limits
        from ipshield.serve.settings import ServeSettings

        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise IPShieldError(f"${SETTINGS_ENV} is not set: this factory is for the workers of "
                                "`ipshield serve --workers N`", "start the service with `ipshield serve`")
        setup_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
        settings = ServeSettings.model_validate_json(raw)
        install_pil_limits(settings.max_image_pixels)
        return create_app(settings)
    except IPShieldError as exc:
        log.error("error: %s", exc.problem)
        if exc.fix:
            log.error("  fix: %s", exc.fix)
    except Exception as exc:
        if os.environ.get("IPSHIELD_DEBUG"):
            raise
        log.error("internal error: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:500])
        log.error("run with IPSHIELD_DEBUG=1 for the traceback")
    raise SystemExit(STARTUP_FAILURE)


def serve_forever(settings, host: str = LOOPBACK, port: int = 8000, log_level: str = "info", workers: int = 1) -> None:
    """Run the service until interrupted: in this process (``workers == 1``) or in ``workers``
    processes that share the port (the database is opened and migrated here first, once)."""
    import uvicorn

    from ipshield.serve.db import open_db

    log_level = check_run_options(port, workers, log_level)
    common = dict(host=host, port=port, log_level=log_level, access_log=True, timeout_graceful_shutdown=10)
    engine = open_db(settings.db)  # a bad database fails here, before a model is loaded
    if workers > 1:
        engine.dispose()
        _serve_workers(settings, workers, log_level, common)
        return
    from ipshield.serve.app import create_app
    from ipshield.serve.images import install_pil_limits

    # process-wide: PIL refuses to decode anything over the service's pixel limit (a second line
    # of defence behind the header check in decode_image)
    install_pil_limits(settings.max_image_pixels)
    app = create_app(settings, engine=engine)
    uvicorn.run(app, **common)


def _serve_workers(settings, workers: int, log_level: str, common: dict) -> None:
    """``uvicorn.run(APP_FACTORY, factory=True, workers=N)``, unrolled so that a worker that could not
    start (it exits with uvicorn's startup-failure status and stops the others) makes this an error
    instead of a quiet exit."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    os.environ[LOG_LEVEL_ENV] = log_level
    # a worker answers the supervisor's health check once it has started its interpreter and
    # imported uvicorn; on a busy machine that can take longer than uvicorn's default 5 s. (A worker
    # that dies while being asked is noticed only when this timeout runs out.)
    config = uvicorn.Config(APP_FACTORY, factory=True, workers=workers, timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
                            **common)
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        with _workers_skip_main():
            supervisor.run()
    except KeyboardInterrupt:  # pragma: no cover - the supervisor handles the signals itself
        pass
    finally:
        sock.close()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise IPShieldError("a worker process of the service could not start (its error is logged above)",
                            "fix what the log says; `ipshield serve --workers 1` shows the same error at once")


@contextlib.contextmanager
def _workers_skip_main():
    """Spawned workers run the parent's main script again before anything else; for the ``ipshield``
    console script that imports the whole CLI (torch, every method) in each worker, seconds of CPU
    for nothing: the worker needs only the app factory. Naming the main module ``ipshield.__main__``
    (what ``python -m ipshield`` runs, the same command line) lets multiprocessing skip it."""
    import importlib.machinery
    import sys

    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None):
        yield
        return
    main.__spec__ = importlib.machinery.ModuleSpec("ipshield.__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None
