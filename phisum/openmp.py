"""One OpenMP worker pool at a time, so a model call's CPU threads spin between operations.

libgomp, the OpenMP runtime in PyTorch's Linux CPU wheels, gives every thread that runs a parallel
region a pool of worker threads, kept until that thread exits. Once the pools' threads together
outnumber the CPUs, libgomp stops letting idle workers spin and puts them to sleep between
parallel regions instead (its throttled spin count), for every pool. A decode step is thousands of
small parallel operations, each of which then waits for a sleeping worker to be woken. A model
loaded in one thread and run in another, as the app's micro-batcher and the chat's streaming
thread do, is in exactly that state on a machine whose cores torch uses all of: the thread that
loaded it keeps an idle pool. `benchmarks/serving.py` measures it (`transformers-pools`).

`release_pool()` hands the calling thread's workers back (OpenMP 5.0's omp_pause_resource_all;
its next parallel region starts new ones), so the thread that runs the model next has the only pool.
"""

from __future__ import annotations

import ctypes
import os
import sys

_OMP_PAUSE_HARD = 2
_runtimes: list | None = None


def _libgomp() -> list:
    """Every libgomp this process has loaded (torch's own copy, and the system's if another
    library brought it), found once torch is imported."""
    global _runtimes
    if _runtimes is None:
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libgomp")}
        except OSError:  # not Linux
            paths = set()
        if not paths and "torch" not in sys.modules:
            return []  # torch not imported yet: look again next time
        found = []
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
                found.append(lib.omp_pause_resource_all)
            except (OSError, AttributeError):  # an old libgomp without OpenMP 5.0's pause
                continue
        _runtimes = found
    return _runtimes


def release_pool() -> bool:
    """Hand back the calling thread's OpenMP worker threads. False where there is nothing to do
    it with (torch on another OpenMP runtime, macOS, Windows) or it was refused."""
    pauses = _libgomp()
    return bool(pauses) and all(pause(_OMP_PAUSE_HARD) == 0 for pause in pauses)
