"""The transformers backend: what is specific to peft adapters in this process (the contract
every backend meets is in test_backends.py)."""

import json
import shutil
import threading
import time

import pytest

from phisum import inference
from phisum.backends import load_backend
from phisum.generation import BASE, GenerationSettings, InputError

DIALOGUES = ["#Person1#: Hi, is the shop open?\n#Person2#: Yes, until nine.",
             "#Person1#: Where is my key?\n#Person2#: On the table, next to the lamp. Look again."]
SHORT = GenerationSettings(max_new_tokens=12)


def texts(gens):
    return [g.text for g in gens]


def test_zero_adapter_equals_base_and_trained_adapter_differs(tiny_backend):
    base = texts(inference.summarize(tiny_backend, DIALOGUES, BASE, SHORT))
    assert texts(inference.summarize(tiny_backend, DIALOGUES, "zero", SHORT)) == base
    assert texts(inference.summarize(tiny_backend, DIALOGUES, "dialogsum", SHORT)) != base
    # switching back really turns the adapter off again
    assert texts(inference.summarize(tiny_backend, DIALOGUES, BASE, SHORT)) == base


def test_batched_generation_matches_one_at_a_time(tiny_backend):
    batched = texts(inference.summarize(tiny_backend, DIALOGUES, "dialogsum", SHORT, batch_size=8))
    single = [inference.summarize(tiny_backend, [d], "dialogsum", SHORT)[0].text for d in DIALOGUES]
    assert batched == single


def test_rows_that_finish_leave_the_batch_and_the_rest_continue_unchanged(tiny_backend):
    """A row that stops early (here a stop string taken from its own output) leaves the batch:
    generate runs again on the remaining rows from the KV cache, and every row, early or late,
    base or adapter, is what it is alone (fp32)."""
    settings = GenerationSettings(max_new_tokens=24)
    prompts = [f"#Person1#: question {i}?\n#Person2#: answer {i} and more." for i in range(4)]
    systems = [BASE, "dialogsum", BASE, "dialogsum"]
    free = [tiny_backend.generate([p], s, settings)[0] for p, s in zip(prompts, systems)]
    stop = next(g.text[6:10] for g in free if len(g.text) > 12)  # ends at least one row early
    alone = [tiny_backend.generate([p], s, settings, (stop,))[0] for p, s in zip(prompts, systems)]
    assert sorted(g.finish_reason for g in alone)[-1] == "stop" and any(g.new_tokens == 24 for g in alone)
    calls, original = [], tiny_backend.model.generate

    def counting(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    tiny_backend.model.generate = counting
    try:
        together = tiny_backend.generate(prompts, systems, settings, (stop,))
    finally:
        del tiny_backend.model.generate
    assert [(g.text, g.new_tokens, g.finish_reason) for g in together] == \
        [(g.text, g.new_tokens, g.finish_reason) for g in alone]
    assert calls[0] == 4 and len(calls) > 1 and calls[-1] < 4, calls
    # taken as they finish: rows that left early come back in groups before the batch's end
    groups = list(tiny_backend.generate_as_ready(prompts, systems, settings, (stop,)))
    assert len(groups) > 1 and all(alone[i].new_tokens < 24 for group in groups[:-1] for i, _ in group)
    ready = dict(pair for group in groups for pair in group)
    assert [ready[i].text for i in range(4)] == [g.text for g in alone]


def test_the_batcher_hands_back_rows_that_leave_early_but_never_a_calls_last_row():
    """A call's last row comes with its batch's end, so no caller is released while its batch
    runs (the wait for returning users counts them then); a failure after early rows still fails."""
    from phisum.backends.batching import MicroBatcher

    taken = threading.Event()  # the caller has the early rows: the batch may end

    def run_rows(rows, settings, stops, on_done=None):
        for k, row in enumerate(rows):
            if row.startswith("short"):
                on_done(k, f"{row}!")
        if len(rows) > 1:
            taken.wait(5)
        if "boom" in rows:
            raise RuntimeError("boom")
        return [f"{p}!" for p in rows]

    def groups(rows):
        taken.clear()
        ready = batcher.submit_as_ready(rows, SHORT, (), 8)
        first = next(ready)
        taken.set()
        return [first, *ready]

    batcher = MicroBatcher(run_rows, max_wait=0.0)
    assert groups(["long", "short"]) == [[(1, "short!")], [(0, "long!")]]
    assert groups(["short"]) == [[(0, "short!")]]
    assert groups(["short a", "short b"]) == [[(0, "short a!")], [(1, "short b!")]]  # the last: at the end
    taken.set()
    assert batcher.submit(["long", "short"], SHORT, (), 8) == ["long!", "short!"]
    taken.clear()
    ready = batcher.submit_as_ready(["short", "boom"], SHORT, (), 8)
    assert next(ready) == [(0, "short!")]
    taken.set()
    with pytest.raises(RuntimeError, match="boom"):
        next(ready)


def test_concurrent_calls_share_batches_and_give_the_same_outputs(tiny_backend):
    """Before/after clicks from 8 users at once are micro-batched: fewer model calls than
    calls made, and every caller gets what it would have got alone."""
    prompts = [f"#Person1#: question {i}?\n#Person2#: answer {i}." for i in range(8)]
    alone = [inference.compare(tiny_backend, [p], settings=SHORT)[0] for p in prompts]
    calls = []
    original = tiny_backend._run_rows

    def counting(rows, settings, stops, on_done=None):
        calls.append(len(rows))
        time.sleep(0.05)  # hold the model a little so the other callers queue up
        return original(rows, settings, stops, on_done)

    tiny_backend._batcher.run_rows = counting
    results, errors = [None] * 8, []
    try:
        def worker(i):
            try:
                results[i] = inference.compare(tiny_backend, [prompts[i]], settings=SHORT)[0]
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        tiny_backend._batcher.run_rows = original
    assert not errors
    assert [(a.text, b.text) for a, b in results] == [(a.text, b.text) for a, b in alone]
    assert len(calls) < 8 and max(calls) > 2, calls


def test_calls_a_few_milliseconds_apart_share_one_batch():
    """Users whose answers came back together click again milliseconds apart: the batch waits up to
    max_wait for them instead of running the first click alone; a lone caller never waits."""
    from phisum.backends.batching import MicroBatcher

    def staggered(max_wait, callers=4, expected=8):
        calls = []

        def run_rows(rows, settings, stops, on_done=None):
            calls.append(len(rows))
            return [f"{p}!" for p in rows]

        batcher = MicroBatcher(run_rows, max_wait=max_wait)
        batcher.expected = expected  # the last batch answered several callers, this many rows
        threads = []
        for i in range(callers):
            threads.append(threading.Thread(target=batcher.submit, args=([f"a{i}", f"b{i}"], SHORT, (), 8)))
            threads[-1].start()
            time.sleep(0.04)
        for t in threads:
            t.join(10)
        return calls

    assert staggered(0.8) == [8]
    assert staggered(0.0)[0] == 2  # no wait: the first click runs alone
    start = time.perf_counter()
    assert staggered(5.0, callers=2, expected=4) == [4]  # two users: waits for their 4 rows, no longer
    assert time.perf_counter() - start < 2

    batcher = MicroBatcher(lambda rows, settings, stops, on_done=None: list(rows), max_wait=5.0)
    start = time.perf_counter()
    assert batcher.submit(["x"], SHORT, (), 8) == ["x"]
    assert batcher.submit(["y"], SHORT, (), 8) == ["y"]
    assert time.perf_counter() - start < 2  # one caller at a time: never waits


def test_a_caller_that_missed_a_batch_joins_the_next_full_one():
    """Seen through the app with 8 users: one click arrived milliseconds after a batch of the
    other seven started. The next batch must wait for those seven to come back, not start
    with the late one and leave it out of step with the rest batch after batch."""
    from phisum.backends.batching import MicroBatcher

    calls, started = [], threading.Event()
    release = threading.Event()

    def run_rows(rows, settings, stops, on_done=None):
        calls.append(len(rows))
        started.set()
        release.wait(10)
        return [f"{p}!" for p in rows]

    batcher = MicroBatcher(run_rows, max_wait=2.0)

    def user(i, clicks):
        for _ in range(clicks):
            batcher.submit([f"a{i}", f"b{i}"], SHORT, (), 16)
            time.sleep(0.05)  # the next click comes back through the app a little later

    threads = [threading.Thread(target=user, args=(i, 2)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait(5)
    time.sleep(0.2)
    late = threading.Thread(target=user, args=(9, 1))
    late.start()  # misses the running batch
    time.sleep(0.2)
    release.set()
    for t in [*threads, late]:
        t.join(10)
    assert calls[0] <= 6 and calls[1] == 8  # the late click waits for the three returning users' rows


def test_a_failing_batch_fails_its_callers_and_the_batcher_keeps_serving(tiny_backend):
    original = tiny_backend._batcher.run_rows

    def broken(rows, settings, stops, on_done=None):
        raise RuntimeError("boom")

    tiny_backend._batcher.run_rows = broken
    try:
        with pytest.raises(RuntimeError, match="boom"):
            inference.summarize(tiny_backend, DIALOGUES[:1], BASE, SHORT)
    finally:
        tiny_backend._batcher.run_rows = original
    assert inference.summarize(tiny_backend, DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0


def test_rows_report_their_own_time_not_the_batch_time(tiny_backend):
    prompt, _ = inference.fit_text(tiny_backend, "dialogsum", DIALOGUES[0], 40)
    stopper = inference.summarize(tiny_backend, DIALOGUES[:1], BASE, GenerationSettings(max_new_tokens=40))[0].text
    marker = stopper[1:3]
    # One row stops early on a stop string, the other runs to 40 tokens: same batch, different times.
    early, late = tiny_backend.generate([prompt, prompt + " more"], BASE, GenerationSettings(max_new_tokens=40),
                                        stops=[marker])
    if early.finish_reason == "stop" and late.finish_reason == "length":
        assert early.seconds < late.seconds
    assert early.seconds > 0 and late.seconds > 0


def test_lock_serialises_concurrent_adapter_switches(tiny_backend):
    reference = {s: texts(inference.summarize(tiny_backend, DIALOGUES, s, SHORT)) for s in (BASE, "dialogsum", "oasst")}
    results, errors = [], []

    def worker(system):
        try:
            for _ in range(3):
                results.append((system, texts(inference.summarize(tiny_backend, DIALOGUES, system, SHORT))))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (BASE, "dialogsum", "oasst") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 27
    assert all(out == reference[system] for system, out in results)


def test_encode_left_pads_like_the_tokenizer_without_touching_its_shared_state(tiny_backend):
    import copy

    batch = ["short", "a much longer prompt than the first one", "mid length"]
    reference = copy.deepcopy(tiny_backend.tokenizer)(batch, padding=True, return_tensors="pt")
    enc = tiny_backend.encode(batch)
    assert enc["input_ids"].tolist() == reference.input_ids.tolist()
    assert enc["attention_mask"].tolist() == reference.attention_mask.tolist()
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1  # left padding
    tiny_backend.generate(batch, BASE, GenerationSettings(max_new_tokens=2))
    rust = tiny_backend.tokenizer.backend_tokenizer
    assert rust.padding is None and rust.truncation is None


def test_prompt_building_during_batched_generation_does_not_break_it(tiny_backend):
    # Prompts are tokenized outside the model lock; with tokenizer(..., padding=True)
    # this once failed 7 of 40 batches ("Unable to create tensor").
    stop, errors = threading.Event(), []

    def count():
        while not stop.is_set():
            tiny_backend.count_tokens("some words " * 50)

    counters = [threading.Thread(target=count) for _ in range(2)]
    for t in counters:
        t.start()
    try:
        for _ in range(20):
            try:
                tiny_backend.generate(["short", "a much longer dialogue " * 20, "mid " * 9], BASE,
                                      GenerationSettings(max_new_tokens=1))
            except ValueError as exc:
                errors.append(exc)
    finally:
        stop.set()
        for t in counters:
            t.join()
    assert not errors


def test_closing_a_stream_releases_the_model(tiny_backend):
    stream = inference.stream_chat(tiny_backend, [{"role": "user", "content": "Hi"}], "oasst",
                                   GenerationSettings(max_new_tokens=250))
    next(stream)
    stream.close()
    assert tiny_backend.lock.acquire(timeout=10), "a cancelled stream must release the lock"
    tiny_backend.lock.release()


def test_adapter_checks(tmp_path, tiny_adapters):
    backend = load_backend("tiny", "transformers", {}, progress=False)
    with pytest.raises(Exception, match="not found"):
        backend.add_adapter("x", str(tmp_path / "missing"))

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapters["zero"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(Exception, match="pickled weights are not loaded"):
        backend.add_adapter("x", str(pickled))

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_adapters["zero"], foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"meta-llama/Llama-3.2-1B.*phisum/tiny-phi"):
        backend.add_adapter("x", str(foreign))
    assert backend.adapters == {}


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupted_adapter_file_is_recorded_and_the_backend_still_loads(tmp_path, tiny_adapters, damage):
    """safetensors raises its own error type for a cut or garbled file: it must not stop the app."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters["dialogsum"], broken)
    weights = broken / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 8 + data[8:])
    # the broken one second: peft has already wrapped the model when it fails to load
    backend = load_backend("tiny", "transformers", {"oasst": str(tiny_adapters["oasst"]), "dialogsum": str(broken)},
                           progress=False)
    assert "dialogsum" in backend.missing and "cannot be loaded" in backend.missing["dialogsum"]
    assert "\n" not in backend.missing["dialogsum"] and str(tmp_path) not in backend.missing["dialogsum"]
    assert "oasst" in backend.adapters and "dialogsum" not in backend.model.peft_config
    assert inference.summarize(backend, DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0
    assert inference.compare(backend, DIALOGUES[:1], (BASE, "oasst"), SHORT)[0][1].new_tokens > 0


def test_missing_adapters_are_recorded_not_fatal(tmp_path):
    backend = load_backend("tiny", "transformers", {"dialogsum": str(tmp_path / "nothing")}, progress=False)
    assert "dialogsum" in backend.missing and "not found" in backend.missing["dialogsum"]
    assert str(tmp_path) not in backend.missing["dialogsum"]  # no server path in what users see
    assert inference.summarize(backend, DIALOGUES[:1], BASE, SHORT)[0].new_tokens > 0
    with pytest.raises(InputError, match="not found"):
        inference.summarize(backend, DIALOGUES[:1], "dialogsum", SHORT)


def test_grouped_prefill_keeps_a_sliding_window_model_exact():
    """Gemma 3 keeps only the last `sliding_window` keys in most layers. Prompts longer than the
    window, prefilled in groups and stacked into one cache, must give what one padded generate
    call gives (fp32, a tiny random Gemma 3 with a 12-token window; the tiny Phi has none)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from phisum.backends.hf import TransformersBackend
    from phisum.models import build_tiny_tokenizer
    from phisum.profiles import get_profile

    config = Gemma3TextConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=12,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"],
                              max_position_embeddings=512, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 256
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="dialogsum").eval()
    backend = TransformersBackend(model, build_tiny_tokenizer(), get_profile("tiny"))
    backend.adapters["dialogsum"] = "in memory"
    prompts = ["short one", "a prompt well past the twelve-token window, and then some more words",
               "mid-length prompt here", "x" * 40]
    systems = [BASE, BASE, "dialogsum", "dialogsum"]
    settings = GenerationSettings(max_new_tokens=10)

    def run(group, leave, buffer=True):
        backend.prefill_group, backend.leave_early, backend.buffer_kv = group, leave, buffer
        with backend.lock:
            return [g.text for g in backend._generate_locked(prompts * 2, systems * 2, settings, ())]

    one_call = run(0, False)
    assert run(4, True) == one_call
    assert run(1, False) == one_call
    assert run(4, True, buffer=False) == one_call
    backend.buffer_kv = True
    cache = backend._prefill([[1, 2, 3]] * 2, [BASE] * 2, room=4)  # the grouped path really ran, buffered
    assert {type(layer).__name__ for layer in cache.layers} == {"BufferedLayer", "BufferedSlidingLayer"}


def spy_generate(backend):
    """Records whether each model.generate call routed rows by peft's adapter_names."""
    calls, original = [], backend.model.generate

    def recording(**kwargs):
        calls.append("adapter_names" in kwargs)
        return original(**kwargs)

    backend.model.generate = recording
    return calls


@pytest.mark.parametrize("systems,routed", [([BASE, "dialogsum", BASE, "dialogsum"], False),
                                            ([BASE, "dialogsum", "oasst", BASE], True)])
def test_a_batch_mixing_base_and_adapter_rows_matches_each_row_alone(tiny_backend, systems, routed):
    """Base rows with one adapter's rows (a before/after click) run with the adapter on and its
    update masked off the base rows; two adapters in one batch go through peft's per-row routing.
    Either way every row is what it is alone (fp32), and the adapter is left as it was."""
    prompts = [f"#Person1#: item {i}, please?\n#Person2#: here, item {i}." for i in range(4)]
    alone = [tiny_backend.generate([p], s, SHORT)[0].text for p, s in zip(prompts, systems)]
    calls = spy_generate(tiny_backend)
    try:
        together = texts(tiny_backend.generate(prompts, systems, SHORT))
    finally:
        del tiny_backend.model.generate
    assert together == alone and calls and set(calls) == {routed}
    assert len(set(alone)) > 2  # the systems really differ
    lora_hooks = [m for n, m in tiny_backend.model.named_modules() if ".lora_A." in n and m._forward_hooks]
    assert not lora_hooks  # the mask's hooks are gone
    assert texts(inference.summarize(tiny_backend, DIALOGUES, "dialogsum", SHORT)) == \
        texts(inference.summarize(tiny_backend, DIALOGUES, "dialogsum", SHORT, batch_size=1))


def test_a_dora_adapter_mixed_with_other_rows_runs_one_call_per_system(tmp_path):
    """DoRA rescales the base weight, so zeroing its low-rank update would not give base rows the
    base output, and peft refuses to route rows to it by adapter_names: a batch mixing it with
    other systems runs each system's rows in a call of their own, and every row matches alone."""
    from tests.conftest import tiny_peft_model

    tiny_peft_model(True, seed=3, use_dora=True).save_pretrained(tmp_path / "dora")
    backend = load_backend("tiny", "transformers", {"dora": str(tmp_path / "dora")}, progress=False)
    assert not backend.missing and backend._plain_layers == {}
    prompts = DIALOGUES * 2
    systems = [BASE, "dora", "dora", BASE]
    alone = [backend.generate([p], s, SHORT)[0].text for p, s in zip(prompts, systems)]
    calls = spy_generate(backend)
    assert texts(backend.generate(prompts, systems, SHORT)) == alone and len(calls) >= 2 and not any(calls)
    assert backend._plain_layers == {"dora": []}


def test_an_adapters_prefill_runs_on_bf16_copies_of_its_fp32_lora_weights(tiny_adapters, tiny_backend):
    """Beside a bf16 base, peft keeps LoRA weights in fp32; the prompt's prefill runs on bf16
    copies swapped in for the call, decode steps on the fp32 weights, which are left as they were.
    An fp32 base has nothing to swap."""
    import torch

    backend = load_backend("tiny", "transformers", {"dialogsum": str(tiny_adapters["dialogsum"])}, dtype="bf16",
                           progress=False)
    lora_a = backend._plain_lora_layers("dialogsum")[0].lora_A["dialogsum"]
    weight = lora_a.weight
    assert weight.dtype == torch.float32 and backend.dtype == torch.bfloat16
    seen = []
    hook = lora_a.register_forward_hook(lambda module, args, _out: seen.append((args[0].shape[1], module.weight.dtype)))
    try:
        out = backend.generate(DIALOGUES, "dialogsum", SHORT)
    finally:
        hook.remove()
    assert all(g.new_tokens > 0 for g in out)
    assert {dtype for tokens, dtype in seen if tokens > 1} == {torch.bfloat16}  # the grouped prefill
    assert {dtype for tokens, dtype in seen if tokens == 1} == {torch.float32}  # every decode step
    assert lora_a.weight is weight and weight.dtype == torch.float32
    tiny_backend.generate(DIALOGUES[:1], "dialogsum", SHORT)
    assert tiny_backend._bf16_lora["dialogsum"] == []
