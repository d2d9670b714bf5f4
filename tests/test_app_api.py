"""The real app served on loopback, driven through gradio_client (tiny profile)."""

import threading
import time
import zipfile

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from phisum import inference
from phisum.generation import GenerationSettings
from phisum.ui.summarize_tab import PENDING
from tests.app_server import dialogsum_dir, serve

DIALOGUE = "#Person1#: Is the library open on Sunday?\n#Person2#: Yes, from ten to four."
SETTINGS = (24, False, 0.7, 0.9)  # max new tokens, sample, temperature, top-p


@pytest.fixture(scope="module")
def client(tiny_backend):
    with serve(tiny_backend, dialogsum_dir()) as (url, _):
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def bare_client():
    """An app whose adapters are missing."""
    from phisum.backends import load_backend

    backend = load_backend("tiny", "transformers", {"dialogsum": "/nonexistent/dialogsum"}, progress=False)
    with serve(backend) as (url, _):
        yield Client(url, verbose=False)


def test_every_event_has_an_explicit_api_name(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/summarize", "/chat", "/chat_model", "/live_rouge"} <= names


def test_summarize_returns_base_and_adapter_side_by_side(client, tiny_backend):
    base, base_stats, tuned, tuned_stats, diff, note = client.predict(DIALOGUE, *SETTINGS, api_name="/summarize")
    assert base and tuned and base != tuned
    assert "new tokens" in base_stats and "new tokens" in tuned_stats
    pair = inference.compare(tiny_backend, [DIALOGUE], settings=GenerationSettings(max_new_tokens=24))[0]
    assert (base, tuned) == (pair[0].display, pair[1].display)  # the app shows exactly the backend's output
    job = client.submit(DIALOGUE, *SETTINGS, api_name="/summarize")
    final = job.result(timeout=120)
    *early, last = job.outputs()  # a side that left the batch early may show first, never a pending one last
    assert len(early) <= 1 and list(last) == list(final) and PENDING not in (final[0], final[2])
    assert all((out[0] == PENDING) != (out[2] == PENDING) for out in early)


def test_any_two_systems_can_be_compared(client, tiny_backend):
    left, _, right, _, _, _ = client.predict(DIALOGUE, *SETTINGS, "zero", "oasst", api_name="/summarize")
    pair = inference.compare(tiny_backend, [DIALOGUE], ("zero", "oasst"), GenerationSettings(max_new_tokens=24))[0]
    assert (left, right) == (pair[0].display, pair[1].display)
    with pytest.raises(AppError, match="not in the list of choices"):  # gradio checks the dropdown itself
        client.predict(DIALOGUE, *SETTINGS, "base", "nope", api_name="/summarize")


@pytest.mark.parametrize("bad, message", [("", "empty"), ("  \n ", "empty"), ("\x00\x01\x02\x03" * 50, "binary")])
def test_bad_dialogues_get_a_clear_error_and_the_app_keeps_serving(client, bad, message):
    with pytest.raises(AppError, match=message):
        client.predict(bad, *SETTINGS, api_name="/summarize")
    assert client.predict(DIALOGUE, *SETTINGS, api_name="/summarize")[0]


def test_100kb_dialogue_is_truncated_with_a_visible_notice(client):
    huge = "\n".join(f"#Person{i % 2 + 1}#: sentence number {i} in a very long talk." for i in range(2500))
    assert len(huge) > 100_000
    base, _, tuned, _, _, note = client.predict(huge, *SETTINGS, api_name="/summarize")
    assert "truncated" in note and base and tuned


def test_chat_streams_and_toggles_to_base(client):
    job = client.submit("Hello, who are you?", False, *SETTINGS, api_name="/chat")
    partials = [p for p in job]
    final = job.result()
    assert final and len(partials) >= 2 and partials[-1] == final
    base = client.predict("Hello, who are you?", True, *SETTINGS, api_name="/chat")
    assert base and base != final
    assert "base model" in client.predict(True, api_name="/chat_model")
    assert "oasst" in client.predict(False, api_name="/chat_model")


def test_empty_chat_message_is_refused(client):
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", False, *SETTINGS, api_name="/chat")


def test_cancelled_chat_frees_the_model(client):
    job = client.submit("Tell me a long story.", False, 256, False, 0.7, 0.9, api_name="/chat")
    for _ in job:
        break
    job.cancel()
    t0 = time.time()
    assert client.predict(DIALOGUE, *SETTINGS, api_name="/summarize")[0]
    assert time.time() - t0 < 30


def test_concurrent_requests_all_get_the_same_answer(client):
    reference = client.predict(DIALOGUE, *SETTINGS, api_name="/summarize")[:1]
    results, errors = [], []

    def call():
        try:
            results.append(Client(client.src, verbose=False).predict(DIALOGUE, *SETTINGS,
                                                                    api_name="/summarize")[:1])
        except Exception as exc:  # reported by the assert
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [reference] * 6


def test_live_rouge_scores_base_and_adapter(client, tmp_path):
    note, table, aggregate, chart, archive = client.predict(3, 7, 24, "base", "dialogsum", False,
                                                            api_name="/live_rouge")
    assert "Data:" in note and "ROUGE-1" in aggregate and "dialogsum - base" in aggregate
    assert len(table["data"]) == 3
    # the headline scores and their difference lead the table, ahead of the wide text columns
    assert table["headers"][:5] == ["id", "base ROUGE-L", "dialogsum ROUGE-L", "dialogsum - base", "reference"]
    for row in table["data"]:
        assert abs(row[3] - (row[2] - row[1])) < 2e-3
    assert chart and open(chart, "rb").read(8).startswith(b"\x89PNG")
    names = zipfile.ZipFile(archive).namelist()
    assert {"predictions.jsonl", "metrics.json", "report.md", "rouge.png"} <= set(names)


@pytest.mark.parametrize("n", [0, 51, 2.5])
def test_live_rouge_rejects_n_out_of_range(client, n):
    with pytest.raises(AppError):
        client.predict(n, 0, 24, "base", "dialogsum", False, api_name="/live_rouge")


def test_missing_adapter_is_said_plainly(bare_client):
    base, _, tuned, _, _, note = bare_client.predict(DIALOGUE, *SETTINGS, api_name="/summarize")
    assert base and "no fine-tuned adapter" in tuned and "not loaded" in note
    assert "not loaded" in bare_client.predict(False, api_name="/chat_model")
    assert bare_client.predict("Hi", False, *SETTINGS, api_name="/chat")  # base answers instead


def test_live_rouge_report_folders_stay_bounded_over_100_runs():
    """A long-running Space must not fill its disk with report folders: only the newest few stay."""
    from phisum.ui.rouge_tab import KEEP_RUNS, RunFolders

    folders = RunFolders()
    try:
        for _ in range(100):
            (folders.new() / "report.md").write_text("x")
        assert len(list(folders.root.iterdir())) == KEEP_RUNS
    finally:
        folders.close()
    assert not folders.root.exists()


def test_live_rouge_runs_through_the_app_keep_a_bounded_number_of_reports(tiny_backend):
    from phisum.ui.rouge_tab import KEEP_RUNS

    with serve(tiny_backend) as (url, demo):
        client = Client(url, verbose=False, download_files=False)
        for seed in range(KEEP_RUNS + 4):
            client.predict(1, seed, 16, "base", "dialogsum", False, api_name="/live_rouge")
        assert len(list(demo.run_folders.root.iterdir())) == KEEP_RUNS
    assert not demo.run_folders.root.exists()  # removed with the app
