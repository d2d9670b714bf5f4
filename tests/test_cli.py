import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT

DIALOGUE = "#Person1#: Can I borrow your bike?\n#Person2#: Sure, bring it back by six.\n"


def run(*args, stdin=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "phisum", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_is_instant():
    t0 = time.perf_counter()
    out = run("--help")
    assert out.returncode == 0 and "summarize" in out.stdout and "train" in out.stdout
    assert time.perf_counter() - t0 < 5, "heavy imports belong inside the commands"


def test_summarize_from_stdin_with_base_and_both(tiny_adapters):
    out = run("--profile", "tiny", "summarize", "-", "--adapter", "base", "--max-new-tokens", "8", stdin=DIALOGUE)
    assert out.returncode == 0 and out.stdout.strip()
    both = run("--profile", "tiny", "--adapter-source", f"dialogsum={tiny_adapters['dialogsum']}", "summarize",
               "-", "--adapter", "both", "--max-new-tokens", "8", "--json", stdin=DIALOGUE)
    assert both.returncode == 0, both.stderr
    rows = json.loads(both.stdout)
    assert [r["system"] for r in rows] == ["base", "dialogsum"] and rows[0]["text"] != rows[1]["text"]


def test_summarize_bad_inputs_exit_2_with_a_message(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = run("--profile", "tiny", "summarize", str(empty), "--adapter", "base")
    assert out.returncode == 2 and "empty" in out.stderr
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    out = run("--profile", "tiny", "summarize", str(binary), "--adapter", "base")
    assert out.returncode == 2 and "UTF-8" in out.stderr
    out = run("--profile", "tiny", "summarize", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    out = run("--profile", "tiny", "summarize", "-", "--adapter", "dialogsum", stdin=DIALOGUE)
    assert out.returncode == 2 and "not available" in out.stderr


def test_info_reports_profile_device_dtype_and_missing_adapters():
    out = run("--profile", "tiny", "--adapter-source", "dialogsum=/nowhere", "info")
    info = json.loads(out.stdout)
    assert info["profile"] == "tiny" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert "dialogsum" in info["missing_adapters"]


def test_terminal_chat_streams_a_reply(tiny_adapters):
    out = run("--profile", "tiny", "--adapter-source", f"oasst={tiny_adapters['oasst']}", "chat",
              "--max-new-tokens", "8", stdin="Hello!\n\n")
    assert out.returncode == 0 and "bot> " in out.stdout and "you> " in out.stdout


def test_global_options_work_before_or_after_the_command(tiny_adapters):
    before = run("--profile", "tiny", "--backend", "transformers", "info")
    after = run("info", "--profile", "tiny", "--backend", "transformers")
    assert before.returncode == after.returncode == 0, after.stderr
    assert json.loads(before.stdout)["profile"] == json.loads(after.stdout)["profile"] == "tiny"
    out = run("summarize", "-", "--profile", "tiny", "--adapter", "base", "--max-new-tokens", "4", stdin=DIALOGUE)
    assert out.returncode == 0, out.stderr


def test_info_says_why_the_profile_and_backend_were_chosen():
    info = json.loads(run("--profile", "tiny", "info").stdout)
    assert "from --profile" in info["why"] and info["backend"] == "transformers"
    assert "ships no GGUF" in info["why"]  # auto: the tiny profile has no llama.cpp model


def test_unbounded_and_invalid_input_is_refused_in_one_line(tmp_path):
    """/dev/zero, endless pipes and invalid UTF-8 stop at the read with one line, under a memory cap."""
    import resource

    def cap():  # 6 GB of address space: an unbounded read would be killed, not answered
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    zero = subprocess.run([sys.executable, "-m", "phisum", "--profile", "tiny", "summarize", "/dev/zero"],
                          capture_output=True, text=True, cwd=ROOT, timeout=180, preexec_fn=cap,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert zero.returncode == 2 and zero.stderr.strip().count("\n") == 0 and "over 4 MB" in zero.stderr
    bad = run("--profile", "tiny", "summarize", "-", "--adapter", "base", stdin=None)
    assert bad.returncode == 2
    invalid = subprocess.run([sys.executable, "-m", "phisum", "--profile", "tiny", "summarize", "-"],
                             input=b"#Person1#: caf\xe9\n", capture_output=True, cwd=ROOT, timeout=180,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert invalid.returncode == 2 and b"not UTF-8" in invalid.stderr and b"Traceback" not in invalid.stderr


def test_bad_global_option_values_are_one_line():
    for args in (["--threads", "-1", "info"], ["--profile", "llama", "info"], ["--backend", "tgi", "info"]):
        out = run(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
