import os
from pathlib import Path

import pytest

# Tests never reach the network: the Hub client fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
EMBEDDED_ADAPTERS = ROOT / "assets" / "adapters" / "embedded"


def require_data(sub: str) -> Path:
    path = DATA / sub
    if not path.exists():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md); this test reads it in place")
    return path


def tiny_peft_model(trained: bool, seed: int = 1, **lora):
    """A real peft LoRA model on the tiny base. `trained=False` is peft's default init
    (B = 0: output identical to the base); `trained=True` has random B, so it changes
    the output like a trained adapter does. `lora` overrides LoraConfig fields."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phisum.models import build_tiny_model
    from phisum.profiles import PROFILES

    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": list(PROFILES["tiny"].lora_target_modules),
                           "init_lora_weights": not trained, "task_type": "CAUSAL_LM", **lora})
    model = get_peft_model(build_tiny_model(), config)
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model


def make_tiny_adapter(path: Path, trained: bool, seed: int = 1) -> Path:
    """tiny_peft_model saved to `path`."""
    tiny_peft_model(trained, seed).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dialogsum": make_tiny_adapter(root / "dialogsum", trained=True, seed=1),
        "oasst": make_tiny_adapter(root / "oasst", trained=True, seed=2),
        "zero": make_tiny_adapter(root / "zero", trained=False),
    }


@pytest.fixture(scope="session")
def tiny_backend(tiny_adapters):
    """The transformers backend on the tiny profile with real peft adapters."""
    from phisum.backends import load_backend

    return load_backend("tiny", "transformers", {k: str(v) for k, v in tiny_adapters.items()}, progress=False)
