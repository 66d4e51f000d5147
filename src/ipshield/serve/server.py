"""Running the app: ``serve_forever`` (the CLI) and ``ServerThread`` (tests and benchmarks: uvicorn in
a background thread on 127.0.0.1 and a free port)."""

from __future__ import annotations

import socket
import threading
import time

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


def serve_forever(settings, host: str = LOOPBACK, port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    from ipshield.serve.app import create_app

    if not (1 <= int(port) <= 65535):
        raise IPShieldError(f"port {port} out of range", "give --port between 1 and 65535")
    from ipshield.serve.images import install_pil_limits

    # process-wide: PIL refuses to decode anything over the service's pixel limit (a second line
    # of defence behind the header check in decode_image)
    install_pil_limits(settings.max_image_pixels)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=True, timeout_graceful_shutdown=10)
