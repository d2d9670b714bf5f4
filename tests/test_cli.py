import json
import subprocess
import sys
import time

from tests.conftest import ROOT

DIALOGUE = "#Person1#: Can I borrow your bike?\n#Person2#: Sure, bring it back by six.\n"


def run(*args, stdin=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "phisum", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


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
