import gc
import subprocess
import sys
from pathlib import Path

from phisum.startup import frozen_imports

ROOT = Path(__file__).resolve().parent.parent


def test_frozen_imports_freezes_and_restores_the_collector():
    before = gc.get_freeze_count()
    kept = [[] for _ in range(1000)]  # alive at the end of the block, so frozen
    with frozen_imports():
        assert not gc.isenabled()
        import json  # noqa: F401
    assert gc.isenabled() and gc.get_freeze_count() >= before + len(kept)
    gc.disable()
    try:
        with frozen_imports():
            pass
        assert not gc.isenabled(), "a collector the caller disabled stays disabled"
    finally:
        gc.enable()


def test_importing_the_transformers_backend_freezes_torch_and_transformers():
    probe = ("import gc, sys\nfrom phisum.backends.hf import TransformersBackend\n"
             "print(gc.isenabled(), gc.get_freeze_count(), 'transformers.modeling_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    enabled, frozen, modeling = out.stdout.split()
    assert enabled == "True" and modeling == "True"
    assert int(frozen) > 200_000, "the model stack's import-time objects should be out of the collector's reach"
