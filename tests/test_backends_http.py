"""The openai and llamacpp backends: the wire format as pure functions, a fake vLLM server, and
llama.cpp's server in this process on the embedded model (slow, one server for the module)."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from phisum.backends.base import BackendError
from phisum.backends.openai_compat import OpenAIBackend
from phisum.backends.openai_wire import (completion_payload, display_url, error_text, lora_adapter_name,
                                         parse_completion, parse_stream_event, parse_vllm_models, server_root,
                                         vllm_finish_reason)
from phisum.generation import BASE, GenerationSettings, InputError
from phisum.profiles import PROFILES
from tests.conftest import ROOT

EMBEDDED = PROFILES["embedded"]
ADAPTER = ROOT / "assets" / "adapters" / "embedded" / "dialogsum"
STOPS = ("\nInstruct:",)
GREEDY = GenerationSettings(max_new_tokens=48)


def dialogsum_prompt(dialogue: str) -> str:
    return f"Instruct: Summarize the following conversation.\n{dialogue}\nOutput:\n"


def sample_dialogues(n: int) -> list[str]:
    lines = (ROOT / "assets" / "samples" / "dialogues.jsonl").read_text().splitlines()
    return [json.loads(line)["dialogue"] for line in lines[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ wire format (no server)

def test_vllm_payload_names_the_adapter_and_sends_every_sampling_field():
    path, body = completion_payload("vllm", "P", GREEDY, STOPS, model="dialogsum")
    assert path == "/v1/completions"
    assert body == {"model": "dialogsum", "prompt": "P", "max_tokens": 48, "stop": ["\nInstruct:"],
                    "repetition_penalty": 1.0, "stream": False, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                    "min_p": 0.0}
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.5, top_p=0.8,
                                 repetition_penalty=1.2, seed=7)
    _, body = completion_payload("vllm", "P", sampled, (), model="google/gemma-3-270m", stream=True)
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.5, 0.8, -1, 7)
    assert body["repetition_penalty"] == 1.2 and body["stream_options"] == {"include_usage": True}


def test_llamacpp_payload_sets_every_adapter_scale():
    lora = [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    path, body = completion_payload("llamacpp", "P", GREEDY, STOPS, lora=lora, cache_prompt=True, context_length=512)
    assert path == "/completion"
    assert body["lora"] == lora and body["n_predict"] == 48 and body["cache_prompt"] is True
    assert (body["temperature"], body["top_k"], body["min_p"], body["repeat_last_n"]) == (0.0, 0, 0.0, 512)
    assert "stop_type" in body["response_fields"]
    _, streamed = completion_payload("llamacpp", "P", GREEDY, (), stream=True)
    assert streamed["stream"] is True and "response_fields" not in streamed and streamed["cache_prompt"] is False


@pytest.mark.parametrize("finish,stop_reason,expected", [
    ("stop", None, "eos"), ("stop", "\nInstruct:", "stop"), ("stop", 106, "eos"), ("length", None, "length"),
    ("abort", None, "cancelled")])
def test_vllm_finish_reasons(finish, stop_reason, expected):
    assert vllm_finish_reason(finish, stop_reason) == expected


def test_completion_bodies_map_to_replies():
    vllm = {"choices": [{"text": " A summary.", "finish_reason": "stop", "stop_reason": None}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 5}}
    assert parse_completion("vllm", vllm)[:4] == (" A summary.", "eos", 40, 5)
    for stop_type, reason in [("eos", "eos"), ("word", "stop"), ("limit", "length")]:
        native = {"content": "x", "stop_type": stop_type, "tokens_evaluated": 44, "tokens_predicted": 3,
                  "timings": {"predicted_per_second": 50.0}}
        reply = parse_completion("llamacpp", native)
        assert reply[:4] == ("x", reason, 44, 3) and reply.timings["predicted_per_second"] == 50.0


def test_stream_events():
    assert parse_stream_event("vllm", {"choices": [{"text": "Hi", "finish_reason": None}]}) == ("Hi", None)
    assert parse_stream_event("vllm", {"choices": [{"text": "", "finish_reason": "stop", "stop_reason": "\n"}]}) \
        == ("", "stop")
    assert parse_stream_event("vllm", {"choices": [], "usage": {"completion_tokens": 3}}) == ("", None)
    assert parse_stream_event("llamacpp", {"content": " a", "stop": False}) == (" a", None)
    assert parse_stream_event("llamacpp", {"content": "", "stop": True, "stop_type": "eos"}) == ("", "eos")
    with pytest.raises(BackendError, match="context size"):
        parse_stream_event("llamacpp", {"error": {"code": 400, "message": "exceeds the\ncontext size"}})


def test_vllm_models_list_the_base_and_its_lora_modules():
    body = {"data": [{"id": "other/base", "parent": None, "max_model_len": 4096},
                     {"id": "google/gemma-3-270m", "root": "/models/gemma", "parent": None, "max_model_len": 1024},
                     {"id": "dialogsum", "root": "/adapters/dialogsum", "parent": "google/gemma-3-270m"},
                     {"id": "elsewhere", "root": "/adapters/x", "parent": "other/base"}]}
    base, adapters, max_len = parse_vllm_models(body, prefer=[EMBEDDED.base_model])
    assert (base, adapters, max_len) == ("google/gemma-3-270m", {"dialogsum": "/adapters/dialogsum"}, 1024)
    assert parse_vllm_models(body)[0] == "other/base"
    with pytest.raises(BackendError, match="no base model"):
        parse_vllm_models({"data": [{"id": "a", "parent": "b"}]})


def test_urls_error_texts_and_adapter_names(tmp_path):
    assert str(server_root("http://h:8000/v1/")) == str(server_root("http://h:8000")) == "http://h:8000/"
    assert display_url("http://user:secret@h:8000/v1?key=s") == "http://h:8000"
    with pytest.raises(BackendError, match="not an http"):
        server_root("ftp://h:1")
    assert error_text({"error": {"message": "bad\nthing"}}) == "bad thing"
    assert error_text({"object": "error", "message": "old vLLM"}) == "old vLLM"
    assert error_text({"detail": [{"msg": "field required"}]}) == "field required"
    from phisum.gguf_export import cached_gguf_lora

    exported = cached_gguf_lora(ADAPTER, cache_root=tmp_path)  # the cache's own naming, not a copy of it
    assert lora_adapter_name(str(exported)) == "dialogsum" and lora_adapter_name("/x/my-lora.gguf") == "my-lora"


def test_profile_gguf_is_written_once_atomically_and_rewritten_when_cut(tmp_path, monkeypatch):
    import dataclasses
    import sys
    import types

    from phisum.backends.llamacpp import profile_gguf

    chunk = tmp_path / "part00"
    chunk.write_bytes(b"GGUF" + b"x" * 60)
    writes = []

    def assemble(path):
        writes.append(Path(path))
        Path(path).write_bytes(chunk.read_bytes())
        return Path(path)

    pkg = types.SimpleNamespace(MODEL_NAME="model.gguf", chunk_paths=lambda: [chunk], assemble=assemble)
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", pkg)
    monkeypatch.setenv("PHISUM_CACHE_DIR", str(tmp_path / "cache"))
    profile = dataclasses.replace(EMBEDDED, gguf_package="fake_gguf_pkg")
    target = tmp_path / "cache" / "gguf" / "model.gguf"
    assert profile_gguf(profile, progress=False) == target and target.read_bytes() == chunk.read_bytes()
    assert writes[0].parent == target.parent and writes[0] != target  # written beside it, then renamed
    assert profile_gguf(profile, progress=False) == target and len(writes) == 1
    target.write_bytes(b"GGUF")  # a copy cut short is written again
    assert profile_gguf(profile, progress=False) == target and len(writes) == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]
    with pytest.raises(BackendError, match="ships no GGUF model; pass --gguf FILE"):
        profile_gguf(dataclasses.replace(EMBEDDED, gguf_package=None))


def test_a_closed_port_is_one_line_without_a_traceback():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError) as err:
        OpenAIBackend(EMBEDDED, url, api_key="sk-secret-789", timeout=5)
    message = str(err.value)
    assert message.startswith(f"cannot reach the server at {url}") and "\n" not in message
    assert "Traceback" not in message and "sk-secret-789" not in message and err.value.__suppress_context__


# ------------------------------------------------------------ llama.cpp in this process (slow)

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("xllamacpp", reason="xllamacpp (llama.cpp's server as a wheel) is not installed")
    pytest.importorskip(EMBEDDED.gguf_package, reason="the embedded GGUF package is not installed")
    from phisum.backends.llamacpp import LlamaCppBackend

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PHISUM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        # One thread: two llama.cpp threads spin-waiting on cores that another job holds make decoding crawl.
        backend = LlamaCppBackend.load(EMBEDDED, {"dialogsum": str(ADAPTER), "absent": str(ROOT / "no-such-adapter")},
                                       threads=1, n_parallel=2, progress=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def summaries(llama):
    """Greedy base and adapter outputs for two dialogues, all four rows in one call."""
    prompts = [dialogsum_prompt(d) for d in sample_dialogues(2)]
    outs = llama.generate(prompts * 2, [BASE, BASE, "dialogsum", "dialogsum"], GREEDY, STOPS)
    return prompts, outs


@pytest.fixture(scope="module")
def singles(llama, summaries):
    """The second dialogue alone, one request at a time. llama.cpp's results depend slightly on what
    shares a batch (the base's first tokens are a near tie), so exact comparisons use these."""
    prompt = summaries[0][1]
    return prompt, {system: llama.generate([prompt], system, GREEDY, STOPS)[0] for system in (BASE, "dialogsum")}


@pytest.mark.slow
def test_base_and_adapter_in_one_call(llama, summaries):
    prompts, outs = summaries
    print("\n".join(f"{o.system}: {o.text!r} ({o.finish_reason})" for o in outs))
    assert [o.system for o in outs] == [BASE, BASE, "dialogsum", "dialogsum"]
    for prompt, base, tuned in zip(prompts, outs[:2], outs[2:]):
        assert base.text != tuned.text
        assert tuned.finish_reason == "eos" and 3 <= len(tuned.text.split()) <= 60
        assert tuned.prompt_tokens == base.prompt_tokens == llama.count_tokens(prompt) + 1  # and BOS
        assert 0 < tuned.new_tokens < GREEDY.max_new_tokens and tuned.seconds > 0


@pytest.mark.slow
def test_stop_strings_cut_generate_and_stream(llama, singles):
    prompt, outs = singles
    full = outs["dialogsum"].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    expected = full[:full.index(stop)].strip()
    cut = llama.generate([prompt], "dialogsum", GREEDY, (*STOPS, stop))[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    pieces = list(llama.stream(prompt, "dialogsum", GREEDY, (*STOPS, stop)))
    assert pieces[-1] == expected and all(expected.startswith(p) for p in pieces)


@pytest.mark.slow
def test_stream_matches_generate_and_cancel_frees_the_slot(llama, singles):
    prompt, outs = singles
    assert list(llama.stream(prompt, "dialogsum", GREEDY, STOPS))[-1] == outs["dialogsum"].text

    def busy():
        return any(slot["is_processing"] for slot in llama._json("GET", "/slots"))

    long = GenerationSettings(max_new_tokens=400)
    for how in ("event", "close"):
        cancel = threading.Event()
        stream = llama.stream(prompt, BASE, long, (), cancel=cancel)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        assert busy()
        if how == "event":
            cancel.set()
        else:
            stream.close()
        rest = list(stream)
        assert len(rest) <= 1  # the event lets the stream yield its text once more; a closed one yields nothing
        deadline = time.monotonic() + 5
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not busy(), f"llama.cpp kept generating after the stream was left ({how})"


@pytest.mark.slow
def test_no_kv_state_is_reused_across_requests(llama):
    prompt = dialogsum_prompt(sample_dialogues(3)[2])  # a prompt no other test has sent
    first = llama.complete(prompt, BASE, GREEDY, STOPS)
    tuned = llama.complete(prompt, "dialogsum", GREEDY, STOPS)
    again = llama.complete(prompt, "dialogsum", GREEDY, STOPS)
    # No KV state crosses requests, within an adapter or across: one prompt gives one answer.
    assert first.timings["cache_n"] == tuned.timings["cache_n"] == again.timings["cache_n"] == 0
    assert again.text == tuned.text != first.text


@pytest.mark.slow
def test_tokens_round_trip(llama):
    text = "#Person1#: Hi, how are you?\n#Person2#: Fine, thanks."
    ids = llama.tokenize(text)
    assert llama.detokenize(ids) == text and llama.count_tokens(text) == len(ids) > 5
    assert llama.tokenize("") == []  # no BOS added


@pytest.mark.slow
def test_missing_adapter_and_describe(llama):
    assert llama.systems == [BASE, "dialogsum"]
    assert "no-such-adapter" in llama.missing["absent"]
    with pytest.raises(InputError, match="adapter 'absent' is not available"):
        llama.require("absent")
    with pytest.raises(InputError):
        llama.generate(["x"], "absent")
    info = llama.describe()
    assert (info["backend"], info["style"], info["gguf"], info["n_parallel"], info["slots"]) == \
        ("llamacpp", "llamacpp", "gemma-3-270m-q4_k_m.gguf", 2, 2)
    assert info["adapters"] == {"dialogsum": "assets/adapters/embedded/dialogsum"}
    dumped = json.dumps(info)
    assert llama._secret not in dumped and str(Path.home()) not in dumped and "/tmp" not in dumped


@pytest.mark.slow
def test_openai_backend_on_the_same_server_gives_the_same_outputs(llama, singles):
    prompt, outs = singles
    remote = OpenAIBackend(EMBEDDED, llama.url + "/v1/", api_key=llama._secret, expected_adapters=["dialogsum"])
    try:
        assert (remote.style, remote.slots, remote.context_length) == ("llamacpp", 2, EMBEDDED.context_length)
        assert remote.systems == [BASE, "dialogsum"] and not remote.missing  # named from the exported file
        for system in (BASE, "dialogsum"):
            again = remote.generate([prompt], system, GREEDY, STOPS)[0]
            assert (again.text, again.finish_reason) == (outs[system].text, outs[system].finish_reason)
    finally:
        remote.close()
    with pytest.raises(BackendError, match="HTTP 401"):
        OpenAIBackend(EMBEDDED, llama.url)  # the in-process server takes no request without its key


@pytest.mark.slow
def test_an_adapter_llama_cpp_refuses_is_missing_and_close_stops_the_server(tmp_path, monkeypatch):
    pytest.importorskip("xllamacpp", reason="xllamacpp (llama.cpp's server as a wheel) is not installed")
    pytest.importorskip(EMBEDDED.gguf_package, reason="the embedded GGUF package is not installed")
    from phisum.backends import llamacpp

    monkeypatch.setenv("PHISUM_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    real = llamacpp.export_adapter
    monkeypatch.setattr(llamacpp, "export_adapter", lambda profile, name, spec, token=None:
                        (broken, "broken", tmp_path) if name == "broken" else real(profile, name, spec, token))
    backend = llamacpp.LlamaCppBackend.load(EMBEDDED, {"broken": "x", "dialogsum": str(ADAPTER)}, threads=1,
                                            n_parallel=1, progress=False)
    url = backend.url
    try:
        assert backend.systems == [BASE, "dialogsum"]
        assert backend.missing["broken"].startswith("broken: llama.cpp could not load broken.gguf (")
    finally:
        backend.close()
    with pytest.raises(BackendError, match="cannot reach"):
        OpenAIBackend(EMBEDDED, url, timeout=5)
    with pytest.raises(BackendError, match=r"^llama.cpp could not start on broken.gguf: .+") as err:
        llamacpp.LlamaCppBackend.load(EMBEDDED, None, gguf=str(broken), threads=1, progress=False)
    assert "\n" not in str(err.value)
