"""phisum.allocator: `phisum train` runs under jemalloc where the system has it, glibc's otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phisum import allocator

ROOT = Path(__file__).resolve().parent.parent
needs_jemalloc = pytest.mark.skipif(allocator.jemalloc_library() is None,
                                    reason="jemalloc is not installed (apt-get install libjemalloc2)")


def python(code: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_bad_choice_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    with pytest.raises(ValueError, match=r"PHISUM_MALLOC='tcmalloc': choose one of jemalloc, system"):
        allocator.requested()
    monkeypatch.setenv(allocator.ENV, " System ")
    assert allocator.requested() == "system"


@needs_jemalloc
def test_environment_adds_to_a_preload_and_keeps_the_users_conf():
    env = allocator.jemalloc_environment({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:1"})
    assert env["LD_PRELOAD"] == f"libfoo.so {allocator.jemalloc_library()}" and env["MALLOC_CONF"] == "narenas:1"


@needs_jemalloc
def test_preloaded_jemalloc_is_detected_and_purged():
    code = "from phisum import allocator, fast_trainer; print(allocator.active(), fast_trainer.release_freed_memory())"
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert python(code, plain) == "system True"
    assert python(code, allocator.jemalloc_environment(plain)) == "jemalloc True"


@needs_jemalloc
@pytest.mark.parametrize(("given", "expected"), [(None, allocator.TRAINING_CONF), ("narenas:1", "narenas:1")])
def test_relaunch_keeps_freed_memory_for_the_cpu_trainer_unless_the_user_set_a_conf(given, expected):
    code = ("import os; from phisum import allocator; allocator.relaunch_under_jemalloc(); "
            "print(allocator.active(), os.environ.get('MALLOC_CONF'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_CONF", "_PHISUM_RELAUNCHED", allocator.ENV)}
    result = subprocess.run([sys.executable, "-c", code], env={**env, **({"MALLOC_CONF": given} if given else {})},
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<jemalloc>" not in result.stderr, result.stderr  # jemalloc takes the conf
    if given is None and allocator.nvidia_device_present():
        expected = None  # a GPU run keeps jemalloc's defaults
    assert result.stdout.strip() == f"jemalloc {expected}"


def test_a_gpu_is_seen_by_its_device_node(tmp_path):
    (tmp_path / "nvidiactl").touch()
    assert not allocator.nvidia_device_present(str(tmp_path))
    (tmp_path / "nvidia0").touch()
    assert allocator.nvidia_device_present(str(tmp_path))


def run_train(tmp_path, env: dict) -> subprocess.CompletedProcess:
    from tests.test_training import write_recipe

    data = tmp_path / "dialogsum"
    data.mkdir()
    row = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}
    for split in ("train", "validation"):
        lines = (json.dumps({**row, "fname": f"{split}_{i}"}) for i in range(4))
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path, data, adapter_dir=str(tmp_path / "ad"), max_steps=1)
    return subprocess.run([sys.executable, "-m", "phisum", "train", "--config", str(recipe)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_train_command_line_runs_under_the_chosen_allocator(tmp_path, choice):
    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    result = run_train(tmp_path, {**plain, allocator.ENV: choice})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ad" / "training_summary.json").read_text())
    expected = "jemalloc" if choice == "jemalloc" and allocator.jemalloc_library() else "system"
    assert summary["allocator"] == expected
    assert f"memory allocator: {expected}" in result.stderr


def test_train_refuses_a_bad_allocator_choice(tmp_path):
    result = subprocess.run([sys.executable, "-m", "phisum", "train", "--config", "x.yaml"], cwd=ROOT,
                            env={**os.environ, allocator.ENV: "tcmalloc"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: PHISUM_MALLOC='tcmalloc': choose one of jemalloc, system"
