"""The llamacpp backend: llama.cpp's own server inside this process (xllamacpp), adapters as GGUF LoRAs.

The base GGUF is loaded once; every adapter is exported once to a GGUF LoRA (phisum.gguf_export,
cached by content) and loaded at scale 0, and each request sets the scales it needs, so base and
adapter requests run on one model. The server runs continuous batching over `n_parallel` slots
and listens on 127.0.0.1 only, behind a random API key, so no other local user can send it work.
Everything else is the openai backend's llama.cpp dialect talking to that address.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from phisum.adapters import AdapterError, AdapterSource, adapter_display, check_adapter, resolve_adapter
from phisum.backends.base import BackendError
from phisum.backends.openai_compat import OpenAIBackend
from phisum.backends.openai_wire import one_line
from phisum.config import cache_root
from phisum.generation import BASE
from phisum.profiles import Profile

log = logging.getLogger(__name__)

LOG_WARNINGS = 2  # llama.cpp's verbosity: errors and warnings, not its per-request info lines
# Startup warnings that say nothing a user can act on: one line per LoRA tensor whose base weight
# uses the repacked CPU layout (the adapter runs from plain buffers), and a token-type quirk of the
# Gemma 3 GGUF that llama.cpp corrects itself.
_NOISE = ("cannot use buft 'CPU_REPACK'", "was not control-type")
_LORA_FAILED = re.compile(r"failed to load lora adapter '(?P<path>[^']+)'")
_ERROR_LINE = re.compile(r"^\S+ E (?P<text>.+)$")


class LlamaCppBackend(OpenAIBackend):
    name = "llamacpp"

    def __init__(self, server, profile: Profile, api_key: str, gguf: Path, threads: int, n_parallel: int,
                 adapter_files: Mapping[str, Path], sources: Mapping[str, str], missing: Mapping[str, str],
                 reason: str = "", folders: Mapping[str, Path] | None = None):
        self._server = server  # the server lives as long as this object holds it
        try:
            super().__init__(profile, server.listening_address, api_key=api_key, style="llamacpp", reason=reason,
                             max_concurrency=n_parallel, expected_adapters=adapter_files,
                             adapter_names={name: str(path) for name, path in adapter_files.items()},
                             # Reusing a cached prompt re-evaluates only its last token, in a batch of
                             # another shape: greedy near-ties then flip, and the same click could give
                             # two answers. Recomputing keeps one prompt, one answer.
                             cache_prompt=False)
        except BaseException:
            self._server = None
            raise
        self.missing.update(missing)
        self.adapters.update({name: sources[name] for name in self.adapters if name in sources})
        self.paths.update({name: folder for name, folder in (folders or {}).items() if name in self.adapters})
        self.gguf_name, self.threads, self.n_parallel = gguf.name, threads, n_parallel

    @classmethod
    def load(cls, profile: Profile, adapters: Mapping[str, str] | None = None, reason: str = "", threads: int = 2,
             n_parallel: int = 4, gguf: str | None = None, progress: bool = True,
             token: str | None = None) -> "LlamaCppBackend":
        """Start the server on `gguf` (default: the profile's packaged GGUF) with every adapter in
        `adapters` (name -> folder or Hub id). An adapter that cannot be found, checked, exported or
        loaded goes to `missing` with the reason; the backend starts without it."""
        try:
            import xllamacpp  # noqa: F401
        except ImportError:
            raise BackendError("the llamacpp backend needs the xllamacpp package (pip install xllamacpp); "
                               "or use the transformers backend") from None
        model = Path(gguf).expanduser() if gguf else profile_gguf(profile, progress)
        if not model.is_file():
            raise BackendError(f"GGUF model file {adapter_display(str(model))} not found")
        files, sources, missing, folders = {}, {}, {}, {}
        for name, spec in (adapters or {}).items():
            try:
                files[name], sources[name], folders[name] = export_adapter(profile, name, spec, token)
            except AdapterError as exc:
                missing[name] = one_line(str(exc))
                log.warning("%s", missing[name])
        api_key = secrets.token_urlsafe(32)
        while True:
            try:
                server = start_server(model, files.values(), api_key, profile.context_length, threads, n_parallel)
                break
            except _AdapterRefused as exc:  # start again without it, so the app still comes up
                refused = [n for n, p in files.items() if str(p) == exc.path]
                if not refused:
                    raise BackendError(f"llama.cpp could not load the adapter {exc.path}: {exc.reason}") from None
                for name in refused:
                    missing[name] = f"{name}: llama.cpp could not load {Path(exc.path).name} ({exc.reason})"
                    log.warning("%s", missing[name])
                    del files[name]
        return cls(server, profile, api_key, model, threads, n_parallel, files, sources, missing, reason, folders)

    def describe(self) -> dict:
        info = super().describe()
        # the loopback address changes with every start and is nothing a user connects to
        info["server"] = f"in process on {info.pop('base_url')}"
        info.update(gguf=self.gguf_name, threads=self.threads, n_parallel=self.n_parallel)
        return info

    def close(self) -> None:
        super().close()
        # xllamacpp stops the server and frees the model when its object is freed; this is the only reference.
        self._server = None


# ---------------------------------------------------------------- files

def profile_gguf(profile: Profile, progress: bool = True) -> Path:
    """The profile's packaged GGUF, written once to <cache>/gguf/<MODEL_NAME> and reused after."""
    if not profile.gguf_package:
        raise BackendError(f"the {profile.name} profile ships no GGUF model; pass --gguf FILE (a GGUF of "
                           f"{profile.base_model}) or use the transformers backend")
    try:
        pkg = importlib.import_module(profile.gguf_package)
    except ImportError:
        raise BackendError(f"the {profile.name} profile's GGUF package is not installed (pip install "
                           f"{profile.gguf_package.replace('_', '-')}); or pass --gguf FILE") from None
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    size = _package_size(pkg)
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    message = f"writing {pkg.MODEL_NAME} to {target.parent} (once)"
    if progress:
        print(f"phisum: {message}", file=sys.stderr)
    else:
        log.info("%s", message)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        pkg.assemble(tmp)  # checks the package's sha256 of the whole file
        os.replace(tmp, target)  # a reader never sees a half-written model
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot write {target}: {one_line(str(exc))}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _package_size(pkg) -> int | None:
    """The assembled file's size, from the package's chunks: a cheap check that a cached copy is whole."""
    try:
        return sum(Path(p).stat().st_size for p in pkg.chunk_paths())
    except (AttributeError, OSError):
        return None


def export_adapter(profile: Profile, name: str, spec, token: str | None = None) -> tuple[Path, str, Path]:
    """(GGUF LoRA file, display source, peft folder) of adapter `name`; AdapterError with a one-line reason."""
    from phisum.gguf_export import GGUFExportError, cached_gguf_lora

    if name == BASE or name.startswith("__"):
        raise AdapterError(f"{name!r} is reserved; choose another adapter name")
    path = resolve_adapter(AdapterSource.parse(name, str(spec)), token=token)
    check_adapter(path, profile, name)
    try:
        lora = cached_gguf_lora(path, arch=profile.gguf_arch, cache_root=cache_root())
        return lora, adapter_display(str(path)), path
    except GGUFExportError as exc:
        raise AdapterError(f"{name}: cannot export {adapter_display(str(path))} for llama.cpp: {exc}") from None


# ---------------------------------------------------------------- the server

class _AdapterRefused(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path)
        self.path, self.reason = path, reason


def start_server(model: Path, loras, api_key: str, context_length: int, threads: int, n_parallel: int):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_parallel = n_parallel
    params.n_ctx = context_length * n_parallel  # split evenly: every slot gets the profile's context
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    adapters = []
    for path in dict.fromkeys(str(p) for p in loras):  # one copy of a file that two names share
        adapter = xllamacpp.CommonAdapterLoraInfo()
        adapter.path, adapter.scale = path, 0.0
        adapters.append(adapter)
    params.lora_adapters = adapters
    params.lora_init_without_apply = True
    params.hostnames, params.port = ["127.0.0.1"], 0  # loopback, a free port
    params.api_keys = [api_key]
    # The host-memory prompt cache moves KV states between slots by matching tokens only, without
    # the LoRA scales they were computed with; without it, a slot's cache is cleared whenever a
    # request's scales differ from its last, so cache_prompt can reuse prefixes safely.
    params.cache_ram_mib, params.cache_idle_slots = 0, False
    params.ui = False
    params.verbosity = LOG_WARNINGS
    with _startup_log() as lines:
        try:
            return xllamacpp.Server(params)
        except RuntimeError:  # its message is generic; the cause is in the log
            pass
    errors = [m["text"] for m in map(_ERROR_LINE.match, lines) if m]
    for line in errors:
        failed = _LORA_FAILED.search(line)
        if failed:
            raise _AdapterRefused(failed["path"], one_line(errors[0]))
    raise BackendError(f"llama.cpp could not start on {model.name}: "
                       f"{one_line(errors[0]) if errors else 'see its log above'}")


@contextmanager
def _startup_log():
    """llama.cpp writes its log from C++ to file descriptor 2. While the server starts, that goes
    to a temporary file, which is then replayed less the startup noise, and kept in the yielded
    list for the cause of a failure. After startup its warnings reach stderr directly."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to quiet
        yield lines
        return
    tmp = tempfile.TemporaryFile()
    os.dup2(tmp.fileno(), 2)
    try:
        yield lines
    finally:
        _wait_until_quiet(tmp.fileno())
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        lines.extend(tmp.read().decode("utf-8", "replace").splitlines())
        tmp.close()
        kept = [line for line in lines if not any(noise in line for noise in _NOISE)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def _wait_until_quiet(fd: int, settle: float = 0.06, limit: float = 1.0) -> None:
    """llama.cpp's log has a writer thread of its own: give it a moment to write the last lines."""
    deadline, size, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = os.fstat(fd).st_size
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
        time.sleep(0.02)
