"""Backends behind one contract (`Backend`), chosen by one setting.

`load_backend(settings)` is what the app, the CLI, evaluation and the benchmarks call;
what comes back is a `Backend` whichever engine serves it. `auto` picks llama.cpp for a
profile that ships a GGUF on a machine without CUDA (once xllamacpp is installed) when the work
is interactive (the app, the CLI's summarize and chat: one request's latency), and transformers
+ peft otherwise, batch work included (`evaluate`: its micro-batched rows share each decode step,
where llama.cpp runs requests with different adapters in turns); `openai` needs --base-url.
"""

from __future__ import annotations

import importlib.util
import logging

from phisum.backends.base import Backend, BackendError
from phisum.profiles import Profile, resolve_profile

BACKENDS = ("auto", "transformers", "llamacpp", "openai")
WORKLOADS = ("interactive", "batch")
log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "WORKLOADS", "Backend", "BackendError", "choose_backend", "load_backend"]


def choose_backend(name: str | None, profile: Profile, base_url: str | None = None,
                   workload: str = "interactive") -> tuple[str, str]:
    """(backend name, why) for `workload`: interactive (one user's requests, latency) or batch
    (many rows at once, throughput)."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    if name != "auto":
        return name, f"backend {name!r} chosen explicitly"
    if base_url:
        return "openai", "auto: a server URL was given"
    import torch

    if torch.cuda.is_available():
        return "transformers", "auto: CUDA device found, transformers + peft"
    if not profile.gguf_package:
        return "transformers", f"auto: the {profile.name} profile ships no GGUF, transformers + peft"
    if importlib.util.find_spec("xllamacpp") is None:
        return "transformers", "auto: xllamacpp is not installed, transformers + peft"
    if workload == "batch":
        return "transformers", "auto: batch work on a CPU, transformers + peft micro-batching"
    return "llamacpp", "auto: CPU and a GGUF base, llama.cpp"


def load_backend(profile: str | Profile | None = "auto", backend: str | None = "auto",
                 adapters: dict[str, str] | None = None, base_url: str | None = None, api_key: str | None = None,
                 threads: int | None = None, batch_size: int | None = None, dtype=None, bits: int | None = None,
                 n_parallel: int = 4, progress: bool = True, token: str | None = None,
                 profile_reason: str | None = None, gguf: str | None = None,
                 workload: str = "interactive") -> Backend:
    """Load the base once with `adapters` (name -> folder or Hub id; default: the profile's).
    `profile_reason` says why `profile` was chosen, when the caller resolved it; `workload`
    steers `auto` (see choose_backend)."""
    if isinstance(profile, Profile) and profile_reason:
        why_profile = profile_reason
    else:
        profile, why_profile = resolve_profile(profile)
    name, why_backend = choose_backend(backend, profile, base_url, workload)
    reason = f"{why_profile}; {why_backend}"
    log.info(reason)
    sources = profile.adapter_sources() if adapters is None else dict(adapters)
    if name == "transformers":
        if threads:
            import torch

            torch.set_num_threads(threads)
        from phisum.backends.hf import TransformersBackend

        return TransformersBackend.load(profile, sources, reason, dtype=dtype, bits=bits, progress=progress,
                                        token=token, batch_size=batch_size)
    if bits:
        raise ValueError(f"--bits quantizes through bitsandbytes: only the transformers backend takes it, not {name}")
    if name == "llamacpp":
        from phisum.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.load(profile, sources, reason, threads=threads or 2, n_parallel=n_parallel,
                                    progress=progress, token=token, gguf=gguf)
    if not base_url:
        raise ValueError("the openai backend needs --base-url (or PHISUM_BASE_URL), e.g. http://127.0.0.1:8000")
    from phisum.backends.openai_compat import OpenAIBackend

    return OpenAIBackend(profile, base_url, api_key=api_key, reason=reason, expected_adapters=list(sources))
