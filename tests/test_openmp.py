"""phisum.openmp hands a thread's OpenMP workers back, and the backend does so where it should."""

import os
import subprocess
import sys
import threading

import pytest

from phisum.generation import BASE, GenerationSettings
from phisum.profiles import get_profile

POOL = """
import os, threading, torch
from phisum.openmp import release_pool
torch.set_num_threads(2)
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
x = torch.randn(512, 512)
for _ in range(20):
    x @ x  # a parallel region: this thread gets a worker pool
during = threads()
print(before, during, release_pool(), threads())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="libgomp's worker pools: Linux with two or more CPUs")
def test_release_pool_hands_back_the_calling_threads_workers():
    out = subprocess.run([sys.executable, "-c", POOL], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    before, during, released, after = out.stdout.split()
    if int(during) <= int(before):
        pytest.skip("torch ran the product without OpenMP workers here")
    assert released == "True" and int(after) < int(during), out.stdout


def test_the_transformers_backend_releases_its_pool_after_loading_and_after_each_batch(monkeypatch, tiny_adapters):
    import phisum.backends.hf as hf

    calls = []
    monkeypatch.setattr(hf, "release_pool", lambda: calls.append(threading.current_thread().name) or True)
    backend = hf.TransformersBackend.load(get_profile("tiny"), {"dialogsum": str(tiny_adapters["dialogsum"])},
                                          progress=False)
    assert calls == [threading.current_thread().name]  # the loading thread
    backend.generate(["#Person1#: Hi.\n#Person2#: Hello."], BASE, GenerationSettings(max_new_tokens=4))
    assert calls[1:] == ["phisum-batcher"]  # the thread that ran the batch
    monkeypatch.setattr(hf.TransformersBackend, "release_openmp", False)
    backend.generate(["#Person1#: Hi."], BASE, GenerationSettings(max_new_tokens=4))
    assert len(calls) == 2
