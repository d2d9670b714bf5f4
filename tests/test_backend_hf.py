import json
import shutil
import threading

import pytest

from phisum.engine import Engine
from phisum.generation import BASE, GenerationSettings, InputError

DIALOGUES = ["#Person1#: Hi, is the shop open?\n#Person2#: Yes, until nine.",
             "#Person1#: Where is my key?\n#Person2#: On the table, next to the lamp. Look again."]
SHORT = GenerationSettings(max_new_tokens=12)


def texts(gens):
    return [g.text for g in gens]


def test_zero_adapter_equals_base_and_trained_adapter_differs(tiny_engine):
    base = texts(tiny_engine.summarize(DIALOGUES, BASE, SHORT))
    assert texts(tiny_engine.summarize(DIALOGUES, "zero", SHORT)) == base
    assert texts(tiny_engine.summarize(DIALOGUES, "dialogsum", SHORT)) != base
    # switching back really turns the adapter off again
    assert texts(tiny_engine.summarize(DIALOGUES, BASE, SHORT)) == base


def test_compare_is_one_batch_and_matches_separate_runs(tiny_engine):
    pairs = tiny_engine.compare(DIALOGUES, "dialogsum", SHORT)
    assert [p[0].text for p in pairs] == texts(tiny_engine.summarize(DIALOGUES, BASE, SHORT))
    assert [p[1].text for p in pairs] == texts(tiny_engine.summarize(DIALOGUES, "dialogsum", SHORT))
    assert all(b.system == BASE and t.system == "dialogsum" for b, t in pairs)


def test_batched_generation_matches_one_at_a_time(tiny_engine):
    batched = texts(tiny_engine.summarize(DIALOGUES, "dialogsum", SHORT, batch_size=8))
    single = [tiny_engine.summarize([d], "dialogsum", SHORT)[0].text for d in DIALOGUES]
    assert batched == single


def test_results_carry_counts_and_finish_reason(tiny_engine):
    g = tiny_engine.summarize(DIALOGUES[:1], "dialogsum", SHORT)[0]
    assert g.prompt_tokens == tiny_engine.count_tokens(
        "Instruct: Summarize the following conversation.\n" + DIALOGUES[0] + "\nOutput:\n")
    assert 0 < g.new_tokens <= 12 and g.finish_reason in {"eos", "stop", "length"}


def test_stop_string_trims_output(tiny_engine):
    # Whatever the random model writes, a stop string taken from its own output cuts it there.
    g = tiny_engine.summarize(DIALOGUES[:1], "dialogsum", GenerationSettings(max_new_tokens=24))[0]
    raw = g.text
    assert len(raw) > 6
    marker = raw[3:6]
    prompt, _ = tiny_engine.fit_text("dialogsum", DIALOGUES[0], 24)
    cut = tiny_engine.generate([prompt], "dialogsum", GenerationSettings(max_new_tokens=24), stops=[marker])[0]
    assert cut.finish_reason == "stop" and marker not in cut.text and raw.startswith(cut.text)


@pytest.mark.parametrize("bad", ["", "   ", None, b"bytes", "\x00\x01\x02junk"])
def test_bad_input_raises_input_error(tiny_engine, bad):
    with pytest.raises(InputError):
        tiny_engine.summarize([bad], BASE, SHORT)


def test_long_input_is_truncated_from_the_front_with_a_notice(tiny_engine):
    turns = [f"#Person{i % 2 + 1}#: line {i} of a long talk." for i in range(2000)]
    huge = "\n".join(turns)  # ~60 KB; the tiny context is 512 tokens
    g = tiny_engine.summarize([huge], BASE, SHORT)[0]
    assert g.notices and "truncated" in g.notices[0]
    assert g.prompt_tokens + 12 <= tiny_engine.profile.context_length
    prompt, _ = tiny_engine.fit_text("dialogsum", huge, 12)
    assert "line 1999 of a long talk." in prompt and "line 5 of" not in prompt


def test_missing_and_unknown_adapters_are_clear(tiny_engine):
    with pytest.raises(InputError, match="not available"):
        tiny_engine.summarize(DIALOGUES[:1], "nope", SHORT)


def test_lock_serialises_concurrent_adapter_switches(tiny_engine):
    reference = {s: texts(tiny_engine.summarize(DIALOGUES, s, SHORT)) for s in (BASE, "dialogsum", "oasst")}
    results, errors = [], []

    def worker(system):
        try:
            for _ in range(3):
                results.append((system, texts(tiny_engine.summarize(DIALOGUES, system, SHORT))))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (BASE, "dialogsum", "oasst") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 27
    assert all(out == reference[system] for system, out in results)


def test_encode_left_pads_like_the_tokenizer_without_touching_its_shared_state(tiny_engine):
    import copy

    batch = ["short", "a much longer prompt than the first one", "mid length"]
    reference = copy.deepcopy(tiny_engine.tokenizer)(batch, padding=True, return_tensors="pt")
    enc = tiny_engine.encode(batch)
    assert enc["input_ids"].tolist() == reference.input_ids.tolist()
    assert enc["attention_mask"].tolist() == reference.attention_mask.tolist()
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1  # left padding
    tiny_engine.generate(batch, BASE, GenerationSettings(max_new_tokens=2))
    backend = tiny_engine.tokenizer.backend_tokenizer
    assert backend.padding is None and backend.truncation is None


def test_prompt_building_during_batched_generation_does_not_break_it(tiny_engine):
    # Prompts are tokenized outside the model lock; with tokenizer(..., padding=True)
    # this failed 7 of 40 batches ("Unable to create tensor").
    stop, errors = threading.Event(), []

    def count():
        while not stop.is_set():
            tiny_engine.count_tokens("some words " * 50)

    counters = [threading.Thread(target=count) for _ in range(2)]
    for t in counters:
        t.start()
    try:
        for _ in range(20):
            try:
                tiny_engine.generate(["short", "a much longer dialogue " * 20, "mid " * 9], BASE,
                                     GenerationSettings(max_new_tokens=1))
            except ValueError as exc:
                errors.append(exc)
    finally:
        stop.set()
        for t in counters:
            t.join()
    assert not errors


def test_stream_yields_growing_text_equal_to_generate(tiny_engine):
    messages = [{"role": "user", "content": "Hello there"}]
    settings = GenerationSettings(max_new_tokens=16)
    chunks = list(tiny_engine.stream_chat(messages, "oasst", settings))
    assert len(chunks) > 2 and all(b.startswith(a) for a, b in zip(chunks, chunks[1:]) if a)
    prompt, _ = tiny_engine.fit_chat(messages, 16)
    assert chunks[-1] == tiny_engine.generate([prompt], "oasst", settings, stops=["### Human:"])[0].text


def test_closing_a_stream_cancels_and_releases_the_model(tiny_engine):
    stream = tiny_engine.stream_chat([{"role": "user", "content": "Hi"}], "oasst",
                                     GenerationSettings(max_new_tokens=250))
    next(stream)
    stream.close()
    assert tiny_engine.lock.acquire(timeout=10), "a cancelled stream must release the lock"
    tiny_engine.lock.release()


def test_chat_history_is_dropped_oldest_first_when_too_long(tiny_engine):
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last question"})
    prompt, notices = tiny_engine.fit_chat(history, 64)
    assert prompt.endswith("### Human: last question\n### Assistant:") and "question 0 " not in prompt
    assert notices and tiny_engine.count_tokens(prompt) + 64 <= tiny_engine.profile.context_length


def test_adapter_checks(tmp_path, tiny_adapters):
    engine = Engine.load("tiny", adapters={}, progress=False)
    with pytest.raises(Exception, match="not found"):
        engine.add_adapter("x", str(tmp_path / "missing"))

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapters["zero"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(Exception, match="pickled weights are not loaded"):
        engine.add_adapter("x", str(pickled))

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_adapters["zero"], foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"meta-llama/Llama-3.2-1B.*phisum/tiny-phi"):
        engine.add_adapter("x", str(foreign))
    assert engine.adapters == {}


def test_missing_adapters_are_recorded_not_fatal(tmp_path):
    engine = Engine.load("tiny", adapters={"dialogsum": str(tmp_path / "nothing")}, progress=False)
    assert "dialogsum" in engine.missing and "not found" in engine.missing["dialogsum"]
    assert engine.summarize(DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0
    with pytest.raises(InputError, match="not found"):
        engine.summarize(DIALOGUES[:1], "dialogsum", SHORT)
