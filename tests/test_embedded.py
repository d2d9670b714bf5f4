"""End to end on the embedded Gemma 3 270M: conversion, cached reload, a real summary."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phisum import embedded

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
    root = Path(os.environ.get(embedded.CACHE_ENV) or tmp_path / "cache")
    if embedded.is_cached(root / "embedded" / embedded.cache_dir().name):
        root = tmp_path / "cache"
    env = {**os.environ, embedded.CACHE_ENV: str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("DONE")}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert (target / "model.safetensors").stat().st_size > 500e6 and (target / "tokenizer.json").exists()
    assert not list(target.parent.glob("*.tmp-*")), "temporary folders must not be left behind"
    assert sum("waiting" in err for _, err in outs) == 1, "the second process waits for the first"


@slow
def test_cached_engine_loads_fast_and_summarizes(monkeypatch):
    if not embedded.is_cached():
        embedded.ensure_cache(progress=False)
    from phisum.engine import Engine
    from phisum.generation import BASE, GenerationSettings
    from phisum.ui.common import load_samples

    t0 = time.perf_counter()
    engine = Engine.load("embedded", adapters={}, progress=False)
    load_seconds = time.perf_counter() - t0
    assert load_seconds < 40, f"cached load took {load_seconds:.1f} s"
    assert engine.info()["dtype"] == "bfloat16" and engine.packed_layers > 100
    dialogue = load_samples()[0]["dialogue"]
    out = engine.summarize([dialogue], BASE, GenerationSettings(max_new_tokens=40))[0]
    assert not out.empty and out.new_tokens > 0 and out.prompt_tokens > 50


@slow
def test_app_on_the_embedded_profile_answers_through_its_api():
    from gradio_client import Client

    from phisum.engine import Engine
    from phisum.ui.common import load_samples
    from tests.app_server import serve

    engine = Engine.load("embedded", progress=False)  # with whatever adapters are committed
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
