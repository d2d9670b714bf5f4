"""The training process's memory allocator: jemalloc where the system has it, glibc's otherwise.

A CPU training step allocates and frees gigabytes in shapes that change with every length group.
glibc either hands large blocks back to the kernel at once (every step faults the same pages in
again) or keeps them and fragments as the shapes change (RSS climbs with the step count). jemalloc
keeps freed memory in size classes that the next step reuses, so memory levels off without trims:
the trade Intel's PyTorch CPU guides make, and `torch.backends.xeon.run_cpu --enable-jemalloc`.
The allocator is fixed when a process starts, so `phisum train` starts itself again with jemalloc
preloaded (LD_PRELOAD) once, before anything heavy is imported. PHISUM_MALLOC=system keeps glibc's;
a MALLOC_CONF of the user's own is kept as given. jemalloc's own settings are used otherwise:
without decay (dirty_decay_ms:-1) freed extents of changing shapes were not reused and a 30-step run
grew past 21 GB (README, Performance). Linux only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

ENV = "PHISUM_MALLOC"
CHOICES = ("jemalloc", "system")


def requested() -> str:
    """The allocator asked for in the environment; a bad value is one clear error."""
    value = os.environ.get(ENV, "jemalloc").strip().lower() or "jemalloc"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


def jemalloc_library() -> str | None:
    """jemalloc's soname (the dynamic loader finds it on its own paths), or None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("jemalloc")


def jemalloc_environment(environ: dict | None = None) -> dict | None:
    """`environ` (default os.environ) with jemalloc preloaded; None without jemalloc."""
    library = jemalloc_library()
    if library is None:
        return None
    env = dict(os.environ if environ is None else environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD"), library]))
    return env


@functools.cache
def _mallctl():
    try:
        return ctypes.CDLL(None).mallctl  # exported only when jemalloc is this process's allocator
    except (OSError, AttributeError):
        return None


def active() -> str:
    """"jemalloc" when this process allocates with jemalloc, else "system"."""
    return "jemalloc" if _mallctl() is not None else "system"


def purge_jemalloc() -> bool:
    """Return every arena's unused pages to the kernel (jemalloc's counterpart of malloc_trim)."""
    mallctl = _mallctl()
    if mallctl is None:
        return False
    arenas_all = 4096  # MALLCTL_ARENAS_ALL
    return mallctl(f"arena.{arenas_all}.purge".encode(), None, None, None, 0) == 0


def relaunch_under_jemalloc() -> None:
    """Start this same command again with jemalloc preloaded, when it is wanted, found and not
    already in use. Returns only when nothing is to be done; otherwise the process image is replaced."""
    if requested() != "jemalloc" or active() == "jemalloc" or os.environ.get("_PHISUM_RELAUNCHED"):
        return  # the marker stops a loop where the preload did not take (a static binary, say)
    env = jemalloc_environment()
    if env is None:
        return
    env["_PHISUM_RELAUNCHED"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
