"""Import the heavy libraries without the cyclic garbage collector rescanning them.

Importing torch and transformers builds ~640k long-lived objects. CPython runs a
full collection each time the tracked heap grows by a quarter, so the import
keeps rescanning everything it has built so far (benchmarks/cold_start.py times
the start with and without this). Afterwards every full collection would walk
them again, unless they are frozen. Module-level objects live as long as the
process, so they go into the permanent generation instead. What is frozen is
never collected: only use this around imports, never around code that builds
models or data.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Pause the cyclic GC for the block, then freeze everything alive at its end.

    Nesting and repeating are harmless; an already-imported module costs nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def quiet_library_notices() -> None:
    """Silence two notices that read like a broken install but are not; this is their one explanation.

    - bitsandbytes, on CPUs with AVX-512 bf16, tries to fetch an optional 4-bit CPU kernel from
      the Hub through the `kernels` package, and logs a warning when it cannot (not installed,
      or offline); it then uses its own CPU kernel. Nothing is missing.
    - trl and peft read `model.is_gradient_checkpointing`, which transformers 5 renamed to
      `is_activation_checkpointing`; the FutureWarning comes from their code, on every run.
    phisum's own recipes use the new `activation_checkpointing` keys."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
