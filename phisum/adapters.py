"""Find, check and describe LoRA adapters. One resolver for local folders and Hub ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phisum.profiles import ROOT, Profile

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", "*.json", "*.md", "*.png", "*.yaml"]


# huggingface_hub exception names -> what the user can do; the exceptions' own text is not shown.
DOWNLOAD_FAILURES = {
    "RepositoryNotFoundError": "no such repo, or it is private or gated and HF_TOKEN is missing or lacks access",
    "RevisionNotFoundError": "the repo has no such revision",
    "OfflineModeIsEnabled": "HF_HUB_OFFLINE is set and the adapter is not in the local cache",
    "LocalEntryNotFoundError": "the Hub is unreachable and the adapter is not in the local cache",
}


def adapter_display(path: str) -> str:
    """An adapter's source as shown to users: repo-relative, home as ~, never another absolute path."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        return str(path)
    try:
        return str(resolved.resolve().relative_to(ROOT))
    except ValueError:
        pass
    try:
        return "~/" + str(resolved.relative_to(Path.home()))
    except ValueError:
        return resolved.name  # a folder elsewhere on the server: its name only


class AdapterError(Exception):
    """An adapter is missing, unsafe or built for another base model."""


@dataclass(frozen=True)
class AdapterSource:
    name: str
    source: str
    revision: str | None = None

    @classmethod
    def parse(cls, name: str, spec: str) -> "AdapterSource":
        """`path`, `user/repo` or `user/repo@revision`."""
        if "@" in spec and not Path(spec).exists():
            spec, revision = spec.rsplit("@", 1)
            return cls(name, spec, revision or None)
        return cls(name, spec)


def resolve_adapter(source: AdapterSource, token: str | None = None) -> Path:
    """Local folder as is; otherwise download the adapter files from the Hub."""
    local = Path(source.source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise AdapterError(f"adapter {source.name!r}: {adapter_display(str(local))} is a file; "
                               "expected an adapter folder")
        return local
    looks_like_repo = source.source.count("/") == 1 and not source.source.startswith((".", "/", "~"))
    if not looks_like_repo:
        from phisum.config import adapter_env_name

        raise AdapterError(f"adapter {source.name!r} not found at {adapter_display(str(local))} (train it with "
                           f"`python -m phisum train` or point {adapter_env_name(source.name)} at a folder or "
                           "Hub repo id)")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(source.source, revision=source.revision, allow_patterns=ADAPTER_FILES, token=token)
    except Exception as exc:  # offline, private, missing: say which, never echo a token
        why = DOWNLOAD_FAILURES.get(type(exc).__name__, type(exc).__name__)
        raise AdapterError(f"adapter {source.name!r}: could not download {source.source}"
                           f"{'@' + source.revision if source.revision else ''} from the Hub "
                           f"({why})") from None
    return Path(path)


def check_adapter(path: Path, profile: Profile, name: str = "adapter") -> dict:
    """Refuse pickled weights and adapters trained on another base. Returns the config."""
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise AdapterError(f"{name}: {adapter_display(str(path))} has no adapter_config.json; "
                           "is it a peft adapter folder?")
    if not (path / "adapter_model.safetensors").exists():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = f" (found {', '.join(pickled)}: pickled weights are not loaded)" if pickled else ""
        raise AdapterError(f"{name}: {adapter_display(str(path))} has no adapter_model.safetensors{extra}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{name}: {adapter_display(str(config_file))} is not valid JSON ({exc.msg})") from None
    recorded = config.get("base_model_name_or_path")
    if not profile.accepts_base(recorded):
        raise AdapterError(f"{name}: built for base model {recorded!r}, but the {profile.name} profile runs "
                           f"{profile.base_model!r}; load it with the matching profile")
    return config


def describe_adapter(path: Path) -> dict:
    """Small, display-safe summary: rank, alpha, targets, size."""
    config = json.loads((path / "adapter_config.json").read_text())
    weights = path / "adapter_model.safetensors"
    return {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
        "size_mb": round(weights.stat().st_size / 2**20, 2) if weights.exists() else None,
    }
