"""Start the real app on a free loopback port for API, browser and soak tests."""

from __future__ import annotations

import contextlib
import socket

from tests.conftest import DATA


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dialogsum_dir() -> str | None:
    path = DATA / "dialogsum"
    return str(path) if path.exists() else None


@contextlib.contextmanager
def serve(backend, data_dir: str | None = None, concurrency: int | None = None):
    from phisum.ui import build_demo, launch_options

    demo = build_demo(backend, data_dir, concurrency=concurrency)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()
        demo.run_folders.close()
