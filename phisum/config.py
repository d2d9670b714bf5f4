"""The one place phisum reads its environment variables.

Entry points (app.py, the CLI, the evaluate/train commands) call `from_env()` once,
let their own flags override it, and pass the result down as arguments: nothing
deeper in the package looks at os.environ for these settings.

  PHISUM_PROFILE            auto | phi2 | embedded | tiny
  PHISUM_BACKEND            auto | transformers | llamacpp | openai
  PHISUM_BASE_URL           the OpenAI-compatible server for --backend openai
  PHISUM_API_KEY            its API key, if it needs one (never printed)
  PHISUM_ADAPTER_<NAME>     adapter NAME from a folder or Hub repo id[@revision]
                            (NAME lower-cased, '_' read as '-': PHISUM_ADAPTER_DIALOGSUM_QUICK)
  PHISUM_DIALOGSUM_DIR      local DialogSum folder for the live ROUGE tab
  PHISUM_CACHE_DIR          where the converted model and exported GGUF adapters live
  HF_HUB_OFFLINE            1: never try the Hub (datasets, adapters)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_PREFIX = "PHISUM_ADAPTER_"
CACHE_ENV = "PHISUM_CACHE_DIR"


@dataclass
class Settings:
    profile: str = "auto"
    backend: str = "auto"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    adapters: dict[str, str] = field(default_factory=dict)  # overrides of the profile's adapters
    dialogsum_dir: str | None = None
    hub_offline: bool = False

    def override(self, **flags) -> "Settings":
        """Flags that were given (not None) win over the environment."""
        for key, value in flags.items():
            if value is not None:
                setattr(self, key, value)
        return self


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    adapters = {key[len(ADAPTER_PREFIX):].lower().replace("_", "-"): value
                for key, value in env.items() if key.startswith(ADAPTER_PREFIX) and value}
    return Settings(profile=env.get("PHISUM_PROFILE") or "auto", backend=env.get("PHISUM_BACKEND") or "auto",
                    base_url=env.get("PHISUM_BASE_URL") or None, api_key=env.get("PHISUM_API_KEY") or None,
                    adapters=adapters, dialogsum_dir=env.get("PHISUM_DIALOGSUM_DIR") or None,
                    hub_offline=env.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"))


def adapter_env_name(name: str) -> str:
    """The variable that overrides adapter `name` (for messages that tell users what to set)."""
    return ADAPTER_PREFIX + name.upper().replace("-", "_")


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    root = env.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "phisum"


# ------------------------------------------------------------------ flags shared by the entry points

def add_backend_options(parser, suppress: bool = False) -> None:
    """--profile/--backend/--base-url/--adapter-source/--bits/--threads on `parser`.

    `suppress`: for a subcommand's copy of the global options, so a value given before the
    command is not reset by the subcommand's default (`phisum --profile tiny info` and
    `phisum info --profile tiny` both work)."""
    import argparse

    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--profile", default=default, help="auto (default), or a profile: phi2, embedded, tiny")
    parser.add_argument("--backend", default=default,
                        help="auto (default), transformers, llamacpp or openai (or PHISUM_BACKEND)")
    parser.add_argument("--base-url", default=default, metavar="URL",
                        help="OpenAI-compatible server for --backend openai (or PHISUM_BASE_URL)")
    parser.add_argument("--adapter-source", action="append", default=default, metavar="NAME=SOURCE",
                        help="load adapter NAME from a folder or Hub repo id[@revision] (repeatable)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=default,
                        help="load the base quantized (transformers backend)")
    parser.add_argument("--gguf", default=default, metavar="FILE",
                        help="llamacpp backend: a GGUF of the profile's base (default: the one the profile ships)")
    parser.add_argument("--threads", type=positive_int, default=default,
                        help="CPU threads for generation (default: torch's, or 2 for llama.cpp)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (one clean line otherwise)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 4096, got {value}")
    return value


def settings_from_args(args, environ: Mapping[str, str] | None = None) -> Settings:
    """The environment, overridden by the flags that were given."""
    settings = from_env(environ)
    settings.override(profile=getattr(args, "profile", None), backend=getattr(args, "backend", None),
                      base_url=getattr(args, "base_url", None))
    for spec in getattr(args, "adapter_source", None) or []:
        name, _, source = spec.partition("=")
        if not name or not source:
            raise ValueError(f"--adapter-source expects NAME=SOURCE, got {spec!r}")
        settings.adapters[name] = source
    return settings


def open_backend(args, adapters: list[str] | None = None, progress: bool = True, **kwargs):
    """Load the backend the flags and environment ask for. `adapters`: only these names
    (None: every adapter the profile and overrides name). Prints why on stderr."""
    import sys

    from phisum.backends import load_backend
    from phisum.profiles import resolve_profile

    settings = settings_from_args(args)
    source = "--profile" if getattr(args, "profile", None) else "PHISUM_PROFILE"
    profile, why = resolve_profile(settings.profile, source)
    sources = profile.adapter_sources(settings.adapters)
    if adapters is not None:
        unknown = [name for name in adapters if name not in sources]
        if unknown:
            raise ValueError(f"no source for adapter {unknown[0]!r}; add --adapter-source {unknown[0]}=PATH "
                             f"(known: {', '.join(sources) or 'none'})")
        sources = {name: sources[name] for name in adapters}
    backend = load_backend(profile, settings.backend, sources, base_url=settings.base_url,
                           api_key=settings.api_key, threads=getattr(args, "threads", None),
                           bits=getattr(args, "bits", None), gguf=getattr(args, "gguf", None), progress=progress,
                           profile_reason=why, **kwargs)
    print(f"[phisum] {backend.reason}", file=sys.stderr)
    for name, why in backend.missing.items():
        print(f"[phisum] adapter {name!r} not loaded: {why}", file=sys.stderr)
    return backend
