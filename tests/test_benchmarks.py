"""Smoke tests: every benchmark runs end to end on the tiny profile and prints its table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["generation.py", "cold_start.py", "memory.py", "eval_throughput.py", "train_throughput.py", "serving.py",
           "head_loss.py", "batch_generation.py"]


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_instant_and_documents_usage(script):
    out = run_benchmark(script, "--help", timeout=20)
    assert "Usage:" in out and "--profile" in out
    assert any(flag in out for flag in ("--iterations", "--steps", "--n N"))
    # heavy imports live inside main(): --help must not pull in torch
    probe = (f"import sys, runpy; sys.argv = ['x', '--help']\n"
             f"try: runpy.run_path({str(ROOT / 'benchmarks' / script)!r}, run_name='__main__')\n"
             f"except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported for --help'")
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, timeout=20)


def test_generation_quick_on_tiny_reports_identical_fast_path():
    # one thread: two would wait on each other at every op when other jobs share the CPU
    out = run_benchmark("generation.py", "--profile", "tiny", "--quick", "--threads", "1")
    assert "load average" in out
    row = next(line for line in out.splitlines() if "fast CPU path vs plain bf16" in line)
    assert "tokens identical: True" in row  # the packed path must not change a single token
    ratio = float(row.split()[8])
    assert ratio > 0
    for batch in ("1", "4", "8"):
        assert re.search(rf"^\s+{batch}\s+\d", out, re.MULTILINE), f"batch {batch} row missing"
    assert "first visible text (backend.stream)" in out
    assert re.search(r"^\s+8\s+\d", out.split("App path: inference.summarize")[1], re.MULTILINE)


@pytest.mark.slow
def test_cold_start_quick_on_tiny_times_a_fresh_process():
    out = run_benchmark("cold_start.py", "--profile", "tiny", "--quick")
    label = "cached load (transformers)"
    row = next(line.strip() for line in out.splitlines() if line.strip().startswith(label))
    assert 0 < float(row[len(label):].split()[0]) < 300
    assert "has no GGUF" in out
    # The side-by-side baseline without frozen imports runs too (its speed-up is timed, not asserted: noise).
    assert float(re.search(r"imports not frozen / frozen = ([\d.]+)x", out).group(1)) > 0


@pytest.mark.slow
def test_memory_quick_on_tiny_compares_base_with_two_adapters():
    out = run_benchmark("memory.py", "--profile", "tiny", "--quick")
    assert "stand-in LoRA adapters" in out  # the tiny profile ships no adapters
    ratio = re.search(r"base \+ 2 adapters / base only = ([\d.]+)x RSS", out)
    assert ratio and 0.5 < float(ratio.group(1)) < 3


@pytest.mark.slow
def test_serving_quick_on_tiny_serves_the_real_app_without_errors():
    out = run_benchmark("serving.py", "--profile", "tiny", "--quick")
    for variant in ("transformers-serial", "transformers"):
        assert re.search(rf"^{variant}: p95/p50 = [\d.]+; errors \[\]$", out, re.MULTILINE), f"{variant} row"
    assert float(re.search(r"summaries/min ([\d.]+)x", out).group(1)) > 0
    assert "first side s" in out  # the click until its first side is done, beside the whole click


def test_batch_generation_on_tiny_fp32_every_variant_gives_the_one_call_outputs():
    out = run_benchmark("batch_generation.py", "--profile", "tiny", "--dtype", "fp32", "--quick", "--clicks")
    variants = {"one-call", "grouped", "grouped-before", "grouped-cat", "grouped-fp32-lora", "grouped-by-1",
                "grouped-routed", "grouped-only", "leave-only"}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in variants}
    assert set(rows) == variants, out
    assert all(r[-1] == "4/4" for r in rows.values()), out  # fp32: the strategies change speed, not text
    assert "load average" in out
    assert "2 clicks one at a time vs one batch" in out, out  # --clicks: each dialogue alone, then the ceiling
    assert re.search(r"^batching gives [\d.]+x; its ceiling on this machine, whatever the decode: [\d.]+x$", out,
                     re.MULTILINE), out


def test_batch_generation_builds_a_random_base_from_config_and_tokenizer_files(tmp_path):
    """--random-base: the architecture from config.json, random weights, the tokenizer from its files."""
    from phisum.models import save_tiny

    files = save_tiny(tmp_path / "files")
    (files / "model.safetensors").unlink()  # what a machine without the weights has
    out = run_benchmark("batch_generation.py", "--profile", "tiny", "--dtype", "fp32", "--quick",
                        "--random-base", str(files))
    assert "tiny-random (torch.float32 on cpu), 4 rows" in out, out
    assert re.search(r"^  grouped +[\d.]+ +[\d.]+ +[\d.]+ +\d+ +4/4$", out, re.MULTILINE), out  # s, x, prefill s


def test_eval_throughput_quick_on_tiny_compares_batched_with_one_at_a_time():
    if not (ROOT.parent / "shared" / "data" / "dialogsum").exists():
        pytest.skip("../shared/data/dialogsum is absent (see ../shared/data/README.md)")
    out = run_benchmark("eval_throughput.py", "--profile", "tiny", "--quick", "--threads", "1")
    assert "stand-in LoRA adapter" in out  # the tiny profile ships no adapters
    assert "on transformers" in out and "load average" in out
    assert float(re.search(r"speed-up: ([\d.]+)x", out).group(1)) > 0
    for system in ("base", "dialogsum"):
        assert re.search(rf"^{system}: \d+ of 4 outputs identical", out, re.MULTILINE), f"{system} row missing"


def test_train_throughput_on_tiny_same_losses_both_trainers():
    if not (ROOT.parent / "shared" / "data" / "dialogsum").exists():
        pytest.skip("../shared/data/dialogsum is absent (see ../shared/data/README.md)")
    # --rows first: with the tiny byte tokenizer the longest rows (the default) overflow max_length 768;
    # two variants keep this smoke run short (each one is a fresh process).
    out = run_benchmark("train_throughput.py", "--profile", "tiny", "--steps", "3", "--batch", "4",
                        "--rows", "first", "--variants", "trl,phisum")
    rows = {line[:36].strip(): line[36:].split() for line in out.splitlines()
            if line.startswith(("trl SFTTrainer defaults", "phisum fast CPU path"))}
    assert float(rows["trl SFTTrainer defaults"][0]) > 0 and float(rows["phisum fast CPU path"][0]) > 0
    gap = re.search(r"largest per-step loss difference ([\d.]+)", out)
    assert gap and float(gap.group(1)) < 0.01  # same loss, computed differently


def test_head_loss_benchmark_same_loss_and_gradient():
    out = run_benchmark("head_loss.py", "--profile", "tiny", "--tokens", "16,64", "--iterations", "1")
    rows = [line for line in out.splitlines() if " tokens: " in line]
    assert len(rows) == 2 and all("same loss and gradient: True" in r for r in rows), out


def test_train_throughput_variant_names():
    """NAME@TOKENS/N+jemalloc: group size, trim interval and allocator, and nothing else, change."""
    import ctypes.util

    from benchmarks import train_throughput as bench

    label, fast, kwargs, attention = bench.variant("phisum@1536/4+jemalloc")
    assert fast and attention == "eager" and kwargs == {"max_group_tokens": 1536, "release_every": 4}
    assert label.endswith("groups <= 1536, trim every 4, jemalloc")
    assert bench.variant("phisum-fixed")[2] == {"release_above": None}
    assert bench.variant("phisum@1536^1.5+jemalloc")[2] == {"max_group_tokens": 1536, "release_above": 1.5}
    assert not bench.known_variant("phisum+tcmalloc") and not bench.known_variant("nothing")
    assert bench.variant_environment("phisum/2") == {}
    assert not bench.known_variant("phisum+jemalloc[a,b]")  # ',' separates variants
    assert bench.variant("phisum+jemalloc[oversize_threshold:0;dirty_decay_ms:-1]")[0].endswith(
        "jemalloc oversize_threshold:0,dirty_decay_ms:-1")
    if ctypes.util.find_library("jemalloc"):
        assert "jemalloc" in bench.variant_environment("phisum+jemalloc")["LD_PRELOAD"]
        env = bench.variant_environment("phisum+jemalloc[narenas:1;tcache:false]")
        assert env["MALLOC_CONF"] == "narenas:1,tcache:false" and "jemalloc" in env["LD_PRELOAD"]
