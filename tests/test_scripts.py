"""The scripts under scripts/ that are not covered through the CLI, run as a user runs them."""

import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_training import DIALOGUES


def fake_checkpoint(run, step, adapter, complete=True):
    """A Trainer checkpoint folder: the adapter's files plus the state files resuming needs."""
    folder = run / f"checkpoint-{step}"
    shutil.copytree(adapter, folder)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "train_batch_size": 2}))
        for name in ("optimizer.pt", "scheduler.pt"):  # present, never read by the script
            (folder / name).write_bytes(b"")
    return folder


def test_evaluate_checkpoints_scores_each_against_dialogues_seen(tmp_path, tiny_adapters):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "validation.jsonl", "w") as handle:
        for i, (dialogue, summary) in enumerate(DIALOGUES):
            handle.write(json.dumps({"fname": f"v{i}", "dialogue": dialogue, "summary": summary}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    fake_checkpoint(run, 2, tiny_adapters["zero"])
    fake_checkpoint(run, 4, tiny_adapters["dialogsum"])
    fake_checkpoint(run, 6, tiny_adapters["dialogsum"], complete=False)  # killed while saving
    out = tmp_path / "plots" / "scaling"
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate_checkpoints.py", "--run", str(run), "--profile", "tiny",
         "--data", str(data), "--n", "2", "--batch-size", "2", "--no-semantic",
         "--extra", f"other={tiny_adapters['oasst']}@3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping checkpoint-6" in proc.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    points = {p["name"]: p for p in result["points"]}
    assert set(points) == {"step-2", "step-4", "other"}
    assert (points["step-2"]["examples"], points["step-4"]["examples"], points["other"]["examples"]) == (4, 8, 3)
    assert points["other"]["kind"] == "extra" and points["step-4"]["kind"] == "checkpoint"
    assert all(set(p["scores"]) >= {"rouge1", "rouge2", "rougeL"} for p in points.values())
    assert result["split"] == "validation" and result["items"] == 2
    assert out.with_suffix(".png").stat().st_size > 10_000

    # --reuse: a new checkpoint is scored, the old ones are read back (a marked score survives)
    result["points"][0]["scores"]["rouge1"] = 0.123456
    out.with_suffix(".json").write_text(json.dumps(result))
    fake_checkpoint(run, 8, tiny_adapters["zero"])
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate_checkpoints.py", "--run", str(run), "--profile", "tiny",
         "--data", str(data), "--n", "2", "--batch-size", "2", "--no-semantic", "--reuse", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = {p["name"]: p for p in json.loads(out.with_suffix(".json").read_text())["points"]}
    assert set(points) == {"step-2", "step-4", "step-8"} and points["step-2"]["scores"]["rouge1"] == 0.123456
    assert points["step-8"]["examples"] == 16


def test_evaluate_checkpoints_refuses_a_bad_extra(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/evaluate_checkpoints.py", "--run", str(tmp_path),
                           "--extra", "quick=somewhere", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--extra expects NAME=PATH@DIALOGUES" in proc.stderr.splitlines()[-1]


def lora_deltas(adapter) -> dict:
    """module name -> the full weight update scaling * B @ A that a peft adapter folder holds."""
    import json as json_

    from safetensors.torch import load_file

    config = json_.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    return {key.removesuffix(".lora_A.weight"): scaling * weights[key.replace("lora_A", "lora_B")] @ weights[key]
            for key in weights if key.endswith(".lora_A.weight")}


def test_average_checkpoints_is_the_mean_weight_update(tmp_path, tiny_adapters):
    import torch

    out = tmp_path / "average"
    run = [sys.executable, "scripts/average_checkpoints.py", "--profile", "tiny", "--adapters",
           str(tiny_adapters["dialogsum"]), str(tiny_adapters["oasst"]), "--weights", "1,3", "--out", str(out)]
    # rank 16 holds the weighted sum of two rank-8 updates exactly
    proc = subprocess.run(run + ["--rank", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, merged = (lora_deltas(p) for p in (tiny_adapters["dialogsum"], tiny_adapters["oasst"], out))
    assert set(merged) == set(first) and merged
    for key in merged:
        expected = 0.25 * first[key] + 0.75 * second[key]
        assert torch.allclose(merged[key], expected, atol=1e-4 * expected.abs().max()), key
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    # the folder is kept without --overwrite; rank 2 is a truncation, not the mean
    proc = subprocess.run(run + ["--rank", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr.splitlines()[-1]
    proc = subprocess.run(run + ["--rank", "2", "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    key = next(iter(merged))
    assert torch.linalg.matrix_rank(lora_deltas(out)[key]) == 2


def test_average_checkpoints_refuses_bad_input(tmp_path, tiny_adapters, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("average_checkpoints", ROOT / "scripts" / "average_checkpoints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args):
        try:
            code = script.main(["--profile", "tiny", *args])
        except SystemExit as exc:  # argparse's errors
            code = exc.code
        return code, capsys.readouterr().err.splitlines()[-1]

    one, other = str(tiny_adapters["dialogsum"]), str(tiny_adapters["oasst"])
    code, message = run("--adapters", one, "--out", str(tmp_path / "a"))
    assert code == 2 and "at least two folders" in message
    code, message = run("--adapters", one, str(tmp_path), "--out", str(tmp_path / "b"))
    assert code == 2 and "has no adapter_config.json" in message
    code, message = run("--adapters", one, other, "--weights", "1", "--out", str(tmp_path / "c"))
    assert code == 2 and "--weights needs 2 numbers" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
