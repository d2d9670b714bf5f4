"""Shared helpers for the benchmarks: prompts, timing, RSS, fresh subprocesses, tables.

Light imports only, so every benchmark's --help stays instant.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIALOGSUM_TEST = ROOT.parent / "shared" / "data" / "dialogsum" / "test.jsonl"
SAMPLES = ROOT / "assets" / "samples" / "dialogues.jsonl"
RESULT_TAG = "BENCH_RESULT "  # the line a child process prints its measurements on


def load_dialogues(count: int) -> tuple[list[str], str]:
    """Real DialogSum test dialogues when the shared data is there, else the repo samples."""
    source = DIALOGSUM_TEST if DIALOGSUM_TEST.exists() else SAMPLES
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    dialogues = [r["dialogue"] for r in rows]
    while len(dialogues) < count:
        dialogues += dialogues
    return dialogues[:count], str(source.relative_to(ROOT.parent) if source.is_relative_to(ROOT.parent) else source)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def median(values) -> float:
    return statistics.median(values)


def run_child(code: str, env: dict | None = None, timeout: float = 900) -> dict:
    """Run `code` in a fresh python; return the dict it printed after RESULT_TAG."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"benchmark child failed (exit {proc.returncode}):\n{tail}")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def verdict(ok: bool, absolute: bool = False) -> str:
    """`absolute`: the goal is an absolute rate, which other jobs on the CPU can sink."""
    text = "MET" if ok else "NOT MET"
    if absolute and not ok and os.getloadavg()[0] > (os.cpu_count() or 1):
        text += " (CPU busy: rerun when idle)"
    return text


def make_standin_adapters(profile, folder: Path, names=("dialogsum", "oasst")) -> dict[str, str]:
    """Real peft LoRA adapters (r 16 on the profile's targets) for when the profile's own are not
    there: B is small and random, so each changes outputs a little, as a trained adapter does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phisum.models import load_base

    base, _ = load_base(profile, dtype=torch.float32, progress=False)
    paths = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=list(profile.lora_target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.002)
        # peft reads model.name_or_path, which is the cache folder for the embedded base
        model.peft_config["default"].base_model_name_or_path = profile.base_model
        model.save_pretrained(folder / name)
        base = model.unload()  # back to the plain base for the next adapter
        paths[name] = str(folder / name)
    return paths


def random_base_profile(profile, files: Path):
    """`profile` with its architecture built from `files` (config.json and the tokenizer's files;
    `*.xz` ones are unpacked) and random weights, saved to a temporary folder: timing only, for
    machines the weights cannot reach (the device machine takes 64 MiB). Generation never stops
    early on random weights, so every row runs to the cap."""
    import dataclasses
    import lzma
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="random-base-"))
    for f in files.iterdir():
        if f.suffix == ".xz":
            (folder / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16).save_pretrained(folder)
    return dataclasses.replace(profile, name=f"{profile.name}-random", base_model=str(folder), loader="pretrained",
                               gguf_package=None, base_aliases=(profile.base_model, *profile.base_aliases),
                               description=f"{profile.description}, random weights")
