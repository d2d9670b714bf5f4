"""The training process's memory: its allocator (jemalloc where the system has it, glibc's otherwise),
giving freed memory back, and the resident set size the trainer watches.

A CPU training step allocates and frees gigabytes in shapes that change with every length group.
glibc either hands large blocks back to the kernel at once (every step faults the same pages in
again) or keeps them and fragments as the shapes change (RSS climbs with the step count). jemalloc
keeps freed memory in size classes that the next step reuses, so memory levels off without trims:
the trade Intel's PyTorch CPU guides make, and `torch.backends.xeon.run_cpu --enable-jemalloc`.
The allocator is fixed when a process starts, so `phisum train` starts itself again with jemalloc
preloaded (LD_PRELOAD) once, before anything heavy is imported. PHISUM_MALLOC=system keeps glibc's;
a MALLOC_CONF of the user's own is kept as given. Otherwise, where no NVIDIA device is there (a CPU
run), freed memory is kept for reuse (TRAINING_CONF: no decay, large blocks in an arena of their
own), which saves faulting pages in at every step, and the CPU trainer purges it once RSS grows past
its bound, checked after every length group: without those purges the same settings grew past 21 GB
in 30 steps (README, Performance). GPU runs, whose trainer does not purge, keep jemalloc's defaults.
Linux only; elsewhere nothing changes.
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


TRAINING_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


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


def _purge_jemalloc() -> bool:
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
    if "MALLOC_CONF" not in env and not nvidia_device_present():
        env["MALLOC_CONF"] = TRAINING_CONF
    env["_PHISUM_RELAUNCHED"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def nvidia_device_present(dev: str = "/dev") -> bool:
    """An NVIDIA GPU's device node is there (the process may train on it): checked without
    importing torch, before the relaunch."""
    import glob

    return bool(glob.glob(os.path.join(dev, "nvidia[0-9]*")))


@functools.cache
def _glibc():
    """glibc, for malloc_trim and mallopt; None off glibc (musl, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Give memory freed so far back to the kernel (glibc's malloc_trim).

    Each step's groups have different shapes; glibc reuses freed blocks where they fit and
    otherwise grows its heap, so over a long run the holes add up and RSS climbs by gigabytes
    with the step count. A trim brings RSS back to the live working set; the price is that
    the next step faults its pages in again (benchmarks/train_throughput.py: faults/step).
    Under jemalloc its arenas are purged instead."""
    if active() == "jemalloc":
        return _purge_jemalloc()
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to `limit` for reuse instead of unmapping them.

    By default glibc serves every block above its mmap threshold (at most 32 MB) with a fresh
    mapping and unmaps it on free, so each training step faults in the same gigabytes of
    pages again and the kernel zeroes them (benchmarks/train_throughput.py: faults/step). Kept
    blocks are reused; what they cost in fragmentation the trainer takes back with a trim
    every `release_every` steps. Process-wide; False off glibc and under jemalloc."""
    libc = _glibc()
    if libc is None or active() == "jemalloc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc < 2.35 caps the mmap threshold at 32 MB on 64-bit: fall back to the cap.
    ok = bool(libc.mallopt(m_mmap_threshold, limit) or libc.mallopt(m_mmap_threshold, 32 << 20))
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and ok
