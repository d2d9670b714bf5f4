"""End to end on the embedded Gemma 3 270M: conversion, cached reload, a real summary;
and the cache's self-check on a fake conversion."""

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phisum import embedded
from phisum.config import CACHE_ENV

slow = pytest.mark.slow

RACE = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from phisum.embedded import ensure_cache
t = time.time()
path = ensure_cache(progress=False)
print("DONE", path, round(time.time() - t, 1))
"""


@slow
def test_two_processes_convert_once_and_both_get_a_complete_cache(tmp_path):
    # Use the run's cache when it is still empty (CI), so the suite converts only once.
    root = Path(os.environ.get(CACHE_ENV) or tmp_path / "cache")
    if embedded.is_cached(root / "embedded" / embedded.cache_dir().name):
        root = tmp_path / "cache"
    env = {**os.environ, CACHE_ENV: str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("DONE")}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert (target / "model.safetensors").stat().st_size > 500e6 and (target / "tokenizer.json").exists()
    assert embedded.cache_problem(target) is None, "the conversion records a manifest that its files match"
    assert not list(target.parent.glob("*.tmp-*")), "temporary folders must not be left behind"
    assert sum("waiting" in err for _, err in outs) == 1, "the second process waits for the first"


@slow
def test_cached_engine_loads_fast_and_summarizes(monkeypatch):
    if not embedded.is_cached():
        embedded.ensure_cache(progress=False)
    from phisum import inference
    from phisum.backends import load_backend
    from phisum.generation import BASE, GenerationSettings
    from phisum.ui.common import load_samples

    t0 = time.perf_counter()
    backend = load_backend("embedded", "transformers", {}, progress=False)
    load_seconds = time.perf_counter() - t0
    assert load_seconds < 40, f"cached load took {load_seconds:.1f} s"
    assert backend.describe()["dtype"] == "bfloat16" and backend.packed_layers > 100
    assert backend.model.config._attn_implementation == "phisum_cpu_sdpa"  # 4 query heads per key/value head
    dialogue = load_samples()[0]["dialogue"]
    out = inference.summarize(backend, [dialogue], BASE, GenerationSettings(max_new_tokens=40))[0]
    assert not out.empty and out.new_tokens > 0 and out.prompt_tokens > 50


@slow
def test_app_on_the_embedded_profile_answers_through_its_api():
    from gradio_client import Client

    from phisum.backends import load_backend
    from phisum.ui.common import load_samples
    from tests.app_server import serve

    engine = load_backend("embedded", "transformers", progress=False)  # with whatever adapters are committed
    with serve(engine) as (url, _):
        client = Client(url, verbose=False)
        base, base_stats, tuned, _, _, note = client.predict(load_samples()[1]["dialogue"], 48, False, 0.7, 0.9,
                                                             api_name="/summarize")
        assert base and "new tokens" in base_stats
        if "dialogsum" in engine.adapters:
            assert tuned and tuned != base and "no fine-tuned adapter" not in tuned
        else:
            assert "not loaded" in note
        reply = client.predict("What is the capital of France?", False, 32, False, 0.7, 0.9, api_name="/chat")
        assert reply.strip()


@slow
def test_evaluate_on_a_cpu_picks_the_batching_backend(tmp_path):
    """`evaluate` is batch work: auto gives it transformers' micro-batching, not llama.cpp's turns."""
    pytest.importorskip("xllamacpp", reason="without xllamacpp auto picks transformers everywhere")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"dialogue": "#Person1#: Lunch at noon?\n#Person2#: Yes, see you there.",
                                "summary": "They agree to meet for lunch at noon."}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PHISUM_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "phisum", "evaluate", "--profile", "embedded", "--data", str(data),
                           "--adapters", "base", "--max-new-tokens", "4", "--no-progress", "--no-semantic",
                           "--out", str(tmp_path / "report")], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "auto: batch work on a CPU, transformers" in proc.stderr
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["items"] == 1


@slow
def test_fast_tokenizer_load_matches_autotokenizer():
    from transformers import AutoTokenizer

    from phisum.models import load_embedded_tokenizer
    from phisum.ui.common import load_samples

    path = str(embedded.ensure_cache(progress=False))
    fast, reference = load_embedded_tokenizer(path), AutoTokenizer.from_pretrained(path)
    texts = [s["dialogue"] for s in load_samples()] + ["### Human: héllo 你好 🙂\n### Assistant:", "Instruct: x\nOutput:\n"]
    assert [fast(t).input_ids for t in texts] == [reference(t).input_ids for t in texts]
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    ids = reference(texts[0]).input_ids
    assert fast.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@slow
def test_cached_tokenizer_merges_are_strings_and_encode_like_the_pairs_transformers_wrote():
    from tokenizers import Tokenizer

    from phisum.ui.common import load_samples

    text = (embedded.ensure_cache(progress=False) / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert all(isinstance(m, str) for m in data["model"]["merges"]), "the cache keeps the fast merge form"
    data["model"]["merges"] = [m.split(" ") for m in data["model"]["merges"]]
    cached, pairs = Tokenizer.from_str(text), Tokenizer.from_str(json.dumps(data))
    texts = [s["dialogue"] for s in load_samples()] + [s["summary"] for s in load_samples()] + [
        "### Human: héllo 你好 🙂  tabs\tand  double  spaces\n\n### Assistant:", "Instruct: x\nOutput:\n", "<eos><bos>"]
    assert [e.ids for e in cached.encode_batch(texts)] == [e.ids for e in pairs.encode_batch(texts)]


def _train_bpe(tmp_path, space_in_pieces: bool) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if space_in_pieces:  # no pre-tokenizer: merges may join across spaces
        tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    else:  # Gemma's set-up: spaces become "\u2581" before BPE sees them
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    corpus = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_write_fast_tokenizer_json_keeps_encodings(tmp_path):
    from tokenizers import Tokenizer

    path = _train_bpe(tmp_path, space_in_pieces=False)
    before = Tokenizer.from_file(str(path))
    assert isinstance(json.loads(path.read_text())["model"]["merges"][0], list)
    assert embedded.write_fast_tokenizer_json(path)
    assert isinstance(json.loads(path.read_text())["model"]["merges"][0], str)
    after = Tokenizer.from_file(str(path))
    texts = ["the cat sat on the log", "a dog and a mat", "unseen words here"]
    assert [after.encode(t).ids for t in texts] == [before.encode(t).ids for t in texts]


def test_write_fast_tokenizer_json_leaves_merges_with_spaces_alone(tmp_path):
    path = _train_bpe(tmp_path, space_in_pieces=True)
    assert any(" " in "".join(m) for m in json.loads(path.read_text())["model"]["merges"])
    original = path.read_bytes()
    assert not embedded.write_fast_tokenizer_json(path)
    assert path.read_bytes() == original


# The self-checking cache, on a fake conversion that writes small files in milliseconds.

FAKE_MODEL_SIZE = 20 << 20  # over the whole-file limit, so the sampled checksum is what is tested


def _fake_model_bytes() -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB, a recognisable pattern
    return (block * (FAKE_MODEL_SIZE // len(block) + 1))[:FAKE_MODEL_SIZE]


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, caplog):
    """ensure_cache() on a tmp PHISUM_CACHE_DIR with convert_gguf faked; returns the conversions made."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_convert(out_dir, progress=True):
        calls.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text('{"model_type": "gemma3_text"}\n')
        (out_dir / "tokenizer.json").write_text(json.dumps({"model": {"merges": ["a b"] * 1000}}))
        (out_dir / "model.safetensors").write_bytes(_fake_model_bytes())

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    caplog.set_level(logging.INFO, logger=embedded.__name__)
    return calls


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_cache_records_a_manifest_and_a_good_cache_is_not_rebuilt(fake_cache, caplog):
    path = embedded.ensure_cache(progress=False)
    manifest = json.loads((path / "PHISUM_MANIFEST.json").read_text())
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == {
        p.name: p.stat().st_size for p in path.iterdir() if not p.name.startswith("PHISUM_")}
    assert embedded.cache_problem(path) is None
    assert embedded.ensure_cache(progress=False) == path
    assert len(fake_cache) == 1 and not _warnings(caplog)


@pytest.mark.parametrize("name, offset, damage", [
    ("model.safetensors", 5 * 2**20 + 123, os.urandom(2 * 2**20)),
    ("model.safetensors", 7 * 2**20 + 4097, b"\0" * (48 * 2**10 + 1)),  # stride - block + 1, at an odd offset
    ("model.safetensors", 100, b"\xff" * 8),
    ("model.safetensors", FAKE_MODEL_SIZE - 10, b"\0" * 10),
    ("tokenizer.json", 5000, b"#"),  # a small file is read whole
], ids=["random-bytes-inside", "shortest-run-always-caught", "header", "tail", "one-byte-in-small-file"])
def test_corrupted_cache_is_detected_and_rebuilt(fake_cache, caplog, name, offset, damage):
    path = embedded.ensure_cache(progress=False)
    good = (path / name).read_bytes()
    assert good[offset:offset + len(damage)] != damage
    with open(path / name, "r+b") as handle:
        handle.seek(offset)
        handle.write(damage)

    assert embedded.ensure_cache(progress=False) == path
    assert len(fake_cache) == 2, "rebuilt once"
    assert (path / name).read_bytes() == good and embedded.cache_problem(path) is None
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == [path.name, f"{path.name}.lock"], "no temporary or moved-aside folder is left"
    (warning,) = _warnings(caplog)
    assert f"{name} does not match its checksum (corrupted); rebuilding" in warning and "\n" not in warning


def test_truncated_cache_file_is_rebuilt(fake_cache, caplog):
    path = embedded.ensure_cache(progress=False)
    os.truncate(path / "model.safetensors", FAKE_MODEL_SIZE // 2)
    assert embedded.ensure_cache(progress=False) == path
    assert len(fake_cache) == 2 and (path / "model.safetensors").stat().st_size == FAKE_MODEL_SIZE
    (warning,) = _warnings(caplog)
    assert f"model.safetensors is {FAKE_MODEL_SIZE // 2} bytes, expected {FAKE_MODEL_SIZE}" in warning


@pytest.mark.parametrize("damage", ["missing file", "no manifest", "garbled manifest"])
def test_cache_that_cannot_be_verified_is_rebuilt_once(fake_cache, caplog, damage):
    path = embedded.ensure_cache(progress=False)
    if damage == "missing file":
        (path / "config.json").unlink()
    elif damage == "no manifest":  # a cache written before manifests existed
        (path / "PHISUM_MANIFEST.json").unlink()
    else:
        (path / "PHISUM_MANIFEST.json").write_text('{"files": {"model.safe')
    embedded.ensure_cache(progress=False)
    embedded.ensure_cache(progress=False)
    assert len(fake_cache) == 2 and embedded.cache_problem(path) is None
    (warning,) = _warnings(caplog)
    expected = {"missing file": "config.json is missing", "no manifest": "older phisum",
                "garbled manifest": "PHISUM_MANIFEST.json is unreadable"}[damage]
    assert expected in warning and "rebuilding" in warning


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_go_and_live_ones_stay(fake_cache, caplog):
    folder = embedded.cache_dir().parent
    name = embedded.cache_dir().name
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        dead = folder / f"{name}.tmp-{_dead_pid()}"
        moved_aside = folder / f"{name}.old-{_dead_pid()}"  # killed between the two renames of a rebuild
        no_such_pid = folder / f"{name}.tmp-99999999999"  # beyond any pid_t: os.kill would overflow
        old_format = folder / f"gemma3-270m-q4km-0123456789ab-v1.tmp-{_dead_pid()}"
        live = folder / f"{name}.tmp-{sleeper.pid}"
        reused = folder / f"{name}.tmp-{os.getpid()}"  # its pid number alive again, but hours old
        for tmp in (dead, moved_aside, no_such_pid, old_format, live, reused):
            (tmp / "sub").mkdir(parents=True)
            (tmp / "sub" / "model.safetensors").write_bytes(b"half")
        a_day_ago = time.time() - 24 * 3600
        os.utime(reused, (a_day_ago, a_day_ago))

        embedded.ensure_cache(progress=False)
        assert not any(tmp.exists() for tmp in (dead, moved_aside, no_such_pid, old_format, reused))
        assert live.exists(), "the temporary folder of a live conversion stays"
        assert (folder / name / "model.safetensors").exists() and len(fake_cache) == 1
        assert not _warnings(caplog)
    finally:
        sleeper.kill()
        sleeper.wait()
    embedded.ensure_cache(progress=False)
    assert not live.exists(), "gone at the next start once its process has died"


def test_temp_folder_of_a_dead_pid_stays_while_its_lock_is_held(fake_cache):
    # A conversion in another pid namespace (a container sharing the cache) has a pid
    # that looks dead here; the lock it holds is what keeps its folder.
    path = embedded.ensure_cache(progress=False)
    tmp = path.with_name(f"{path.name}.tmp-{_dead_pid()}")
    tmp.mkdir()
    with open(path.with_name(f"{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        embedded.ensure_cache(progress=False)
        assert tmp.exists()
        fcntl.flock(handle, fcntl.LOCK_UN)
    embedded.ensure_cache(progress=False)
    assert not tmp.exists() and len(fake_cache) == 1
