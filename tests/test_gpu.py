"""The GPU paths, on a CUDA machine: the phi-2 recipes as written (8-bit + paged_adamw_8bit, 4-bit
NF4 QLoRA, bf16, activation checkpointing) through `python -m phisum train` and trl's SFTTrainer,
with the tiny model saved to a folder in place of phi-2, and bf16 generation on the GPU.

CI and the CPU machines skip it; on a GPU machine: `pytest tests/test_gpu.py` (the rest of the
suite runs there too: its tests pick CUDA where it is available).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "phisum" / "recipes"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the bitsandbytes "
                                                                      "and bf16 paths of the phi-2 recipes)")
DIALOGUE = ("#Person1#: Is the report ready?\n#Person2#: Yes, I sent it this morning.", "The report was sent.")
XSUM = ("The council voted on Tuesday to close the old bridge for repairs, which will take a year.",
        "A bridge is to close for a year of repairs.")
OASST = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "How long to boil an egg?",
          "lang": "en", "message_tree_id": "q"},
         {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "About ten minutes.", "rank": 0,
          "lang": "en", "message_tree_id": "q"}]


def write_rows(folder: Path, task: str) -> Path:
    folder.mkdir()
    for split in ("train", "validation"):
        if task == "dialogsum":
            rows = [{"fname": f"{split}_{i}", "dialogue": DIALOGUE[0], "summary": DIALOGUE[1]} for i in range(8)]
        elif task == "xsum":
            rows = [{"id": f"{split}_{i}", "document": XSUM[0], "summary": XSUM[1]} for i in range(8)]
        else:
            rows = [{**m, "message_id": f"{m['message_id']}{i}", "message_tree_id": f"t{i}",
                     "parent_id": m["parent_id"] and f"{m['parent_id']}{i}"} for i in range(8) for m in OASST]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("recipe", ["dialogsum/phi2_lora_8bit.yaml", "dialogsum/phi2_lora_fp16.yaml",
                                    "oasst1/phi2_qlora.yaml", "xsum/phi2_qlora.yaml"])
def test_phi2_recipe_trains_on_the_gpu(tmp_path, recipe):
    """Each phi-2 recipe with its quantization, optimizer and checkpointing as written: only the
    model (tiny, from a folder), the data, the lengths and the step count are overridden."""
    from phisum.models import save_tiny
    from phisum.train_config import parse_recipe

    pargs, _, model_args = parse_recipe(["--config", str(RECIPES / recipe)])
    tiny = save_tiny(tmp_path / "tiny")
    data = write_rows(tmp_path / "data", pargs.task)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "phisum", "train", "--config", str(RECIPES / recipe), "--profile", "none",
               "--model_name_or_path", str(tiny), "--dataset_source", str(data), "--output_dir", str(out),
               "--adapter_dir", str(out / "adapter"), "--max_steps", "3", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "2", "--max_length", "256", "--eval_strategy", "no",
               "--save_strategy", "no", "--warmup_steps", "0", "--disable_tqdm", "true"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    assert summary["device"] == "cuda" and summary["trainer"] == "trl SFTTrainer", summary
    assert summary["steps"] == 3 and summary["final_train_loss"] == summary["final_train_loss"]  # not NaN
    from safetensors.torch import load_file

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b and any(t.abs().sum() > 0 for t in b), "lora_B is still zero: the optimizer never stepped"
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == model_args.lora_r and set(config["target_modules"]) == set(model_args.lora_target_modules)


PROMPTS = ["Instruct: a\nOutput:\n", "Instruct: a much longer prompt than the first one\nOutput:\n",
           "Instruct: mid length\nOutput:\n"]


def test_generation_on_the_gpu_batches_like_one_at_a_time(tiny_adapters):
    """Left padding and the adapter switch on the GPU: a batch of prompts of different lengths gives
    each prompt's one-at-a-time greedy output, with and without the adapter, also when one batch
    mixes base and adapter rows. fp32, so that near-ties of a random model cannot flip a token."""
    from phisum.backends import load_backend
    from phisum.generation import GenerationSettings

    backend = load_backend("tiny", "transformers", {"dialogsum": str(tiny_adapters["dialogsum"])}, progress=False,
                           dtype="fp32")
    assert backend.describe()["device"].startswith("cuda")
    prompts, settings = PROMPTS, GenerationSettings(max_new_tokens=12)
    for system in ("base", "dialogsum"):
        batched = backend.generate(prompts, [system] * 3, settings)
        alone = [backend.generate([p], [system], settings)[0] for p in prompts]
        assert [r.text for r in batched] == [r.text for r in alone], system
    mixed = backend.generate(prompts[:2], ["base", "dialogsum"], settings)
    assert mixed[0].text == backend.generate(prompts[:1], ["base"], settings)[0].text
    assert mixed[1].text == backend.generate(prompts[1:2], ["dialogsum"], settings)[0].text


def test_bf16_generation_on_the_gpu(tiny_adapters):
    """The GPU default dtype (bf16 where the card has it): finite output, and the adapter is used."""
    from phisum.backends import load_backend
    from phisum.generation import GenerationSettings

    backend = load_backend("tiny", "transformers", {"dialogsum": str(tiny_adapters["dialogsum"])}, progress=False,
                           dtype="bf16")
    assert backend.describe()["dtype"] == "bfloat16"
    settings = GenerationSettings(max_new_tokens=12)
    base = [g.text for g in backend.generate(PROMPTS, "base", settings)]
    tuned = [g.text for g in backend.generate(PROMPTS, "dialogsum", settings)]
    assert all(base) and base != tuned
