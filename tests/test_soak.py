"""Soak: 30 concurrent clients for 60 s against `python app.py --profile tiny` on loopback.

Every request is answered or refused with gradio's clear queue-full message; the server log has
no errors; its memory levels off. PHISUM_SOAK_SECONDS shortens or lengthens the run.
"""

import os
import random
import subprocess
import sys
import threading
import time

import psutil
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

from tests.app_server import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CLIENTS = 30
SECONDS = float(os.environ.get("PHISUM_SOAK_SECONDS", 60))
DIALOGUE = "#Person1#: Did you feed the cat?\n#Person2#: Yes, twice. She is still hungry."


def wait_ready(client_url, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            return Client(client_url, verbose=False)
        except Exception:
            time.sleep(1)
    raise TimeoutError("server did not start")


def test_thirty_clients_for_a_minute(tiny_adapters, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PHISUM_ADAPTER_DIALOGSUM": str(tiny_adapters["dialogsum"]),
           "PHISUM_ADAPTER_OASST": str(tiny_adapters["oasst"]), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--profile", "tiny", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url, proc)
        server = psutil.Process(proc.pid)
        counts = {"ok": 0, "queue_full": 0, "user_error": 0}
        errors, rss = [], []
        lock = threading.Lock()
        stop_at = time.time() + SECONDS

        def client_loop(seed):
            rng = random.Random(seed)
            client = Client(url, verbose=False)
            while time.time() < stop_at:
                kind = rng.choice(["summarize", "summarize", "chat", "bad"])
                try:
                    if kind == "summarize":
                        assert client.predict(DIALOGUE, 16, False, 0.7, 0.9, api_name="/summarize")[0]
                    elif kind == "chat":
                        assert client.predict("Hi there", False, 16, False, 0.7, 0.9, api_name="/chat")
                    else:
                        try:
                            client.predict("", 16, False, 0.7, 0.9, api_name="/summarize")
                            raise AssertionError("empty dialogue was accepted")
                        except AppError as exc:
                            assert "empty" in str(exc)
                            kind = "user_error"
                    with lock:
                        counts["ok" if kind != "user_error" else "user_error"] += 1
                except QueueError as exc:
                    assert "Queue is full" in str(exc)
                    with lock:
                        counts["queue_full"] += 1
                    time.sleep(0.2)
                except Exception as exc:
                    with lock:
                        errors.append(repr(exc))

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(server.memory_info().rss)
            time.sleep(2)
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(30)
    log_text = log_path.read_text()
    print(counts, f"rss MB: first {rss[0] / 2**20:.0f}, max {max(rss) / 2**20:.0f}, last {rss[-1] / 2**20:.0f}")
    assert not errors, errors[:5]
    assert counts["ok"] >= CLIENTS, counts
    assert "Traceback" not in log_text and "ERROR" not in log_text, log_text[-3000:]
    # After warm-up, memory must level off rather than climb with every request.
    settled = rss[len(rss) // 3:]
    assert max(settled) - settled[0] < 150 * 2**20, [r // 2**20 for r in rss]
