"""Training on the tiny profile: real peft LoRA/QLoRA, real trl steps, real checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from phisum.train_config import parse_recipe
from phisum import training

ROOT = Path(__file__).resolve().parent.parent
DIALOGUES = [("#Person1#: Is the report ready?\n#Person2#: Yes, I sent it this morning.", "The report was sent."),
             ("#Person1#: Lunch at noon?\n#Person2#: Sure, see you then.", "They will have lunch at noon."),
             ("#Person1#: Where is the bank?\n#Person2#: Next to the station.", "The bank is by the station."),
             ("#Person1#: I lost my keys.\n#Person2#: Check your coat.", "#Person2# suggests the coat.")]


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "dialogsum"
    folder.mkdir()
    for split, rows in (("train", DIALOGUES * 2), ("validation", DIALOGUES[:2])):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for i, (dialogue, summary) in enumerate(rows):
                handle.write(json.dumps({"fname": f"{split}_{i}", "dialogue": dialogue, "summary": summary}) + "\n")
    return folder


def write_recipe(tmp_path, data_dir, **overrides) -> Path:
    recipe = {"profile": "tiny", "use_peft": True, "lora_r": 8, "lora_alpha": 16,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "dense"], "task": "dialogsum",
              "dataset_source": str(data_dir), "output_dir": str(tmp_path / "run"), "max_length": 256,
              "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
              # the CPU trainer on the CPU, also on a GPU machine (tests/test_gpu.py has the GPU paths)
              "use_cpu": True}
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_in_process(recipe: Path):
    """The pieces training.train() chains, kept apart so the test can look at the weights."""
    pargs, sft, margs = parse_recipe(["--config", str(recipe)])
    fast = training.choose_fast_path(pargs, sft, margs)
    model, tokenizer, base_id = training.load_model(pargs, margs, training.runs_on_cpu(sft))
    rows, evaluation, _ = training.load_examples(pargs, tokenizer.eos_token)
    model = training.add_lora(model, margs, base_id, sft.gradient_checkpointing, pargs.init_adapter)
    before = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    trainer = training.build_trainer(model, tokenizer, rows, evaluation, sft, fast, pargs)
    trainer.train()
    return trainer, model, before


def lora_with_random_b(tmp_path, data_dir, **overrides):
    """A fp32 tiny LoRA model whose B is random (B = 0 would make the adapter a no-op), and its rows."""
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, bf16=False, **overrides))])
    model, tokenizer, base_id = training.load_model(pargs, margs, True)
    rows, _, _ = training.load_examples(pargs, tokenizer.eos_token)
    model = training.add_lora(model, margs, base_id, False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return pargs, sft, margs, model, tokenizer, rows


def assert_adapter_changed_base_not(model, before):
    changed = unchanged_base = 0
    for name, param in model.named_parameters():
        # The fast trainer stores frozen Linear weights in bf16 (what autocast computes with
        # anyway), so a base weight is unchanged when it equals its own bf16 rounding.
        same = torch.equal(before[name].to(param.dtype).float().cpu(), param.detach().float().cpu())
        if "lora_" in name:
            changed += not same
        else:
            assert same, f"base parameter {name} changed"
            unchanged_base += 1
    assert changed > 0 and unchanged_base > 0


def test_lora_fast_trainer_changes_adapter_not_base(tmp_path, data_dir):
    trainer, model, before = train_in_process(write_recipe(tmp_path, data_dir))
    assert type(trainer).__name__ == "CompletionOnlySFTTrainer"  # chosen automatically on CPU
    assert trainer.state.global_step == 2
    # transformers 5 enables checkpointing from `activation_checkpointing` inside train(): look at
    # the model itself, since the args alias once said False while every layer recomputed.
    assert not trainer.args.activation_checkpointing
    assert not model.base_model.model.is_activation_checkpointing
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16 and q_proj.lora_A["default"].weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32  # tied to the fp32 embedding
    assert_adapter_changed_base_not(model, before)


def test_fast_path_settings(tmp_path, data_dir):
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir))])
    assert sft.activation_checkpointing  # trl's default, which the CPU path turns off
    assert training.choose_fast_path(pargs, sft, margs)
    assert not sft.activation_checkpointing and not sft.gradient_checkpointing
    assert sft.train_sampling_strategy == "group_by_length" and margs.attn_implementation == "eager"
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, attn_implementation="sdpa"))])
    training.choose_fast_path(pargs, sft, margs)
    assert margs.attn_implementation == "sdpa"  # a recipe's explicit choice stands


@pytest.mark.parametrize("overrides, expected", [({}, (1536, 1.5)), ({"cpu_group_tokens": 768}, (768, 1.5)),
                                                 ({"cpu_group_tokens": 0, "cpu_release_above": 0}, (None, None)),
                                                 ({"cpu_release_above": 2}, (1536, 2.0))])
def test_recipe_sets_the_cpu_trainers_memory_settings(tmp_path, data_dir, overrides, expected):
    """cpu_group_tokens and cpu_release_above reach the trainer; 0 turns each off."""
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, **overrides))])
    fast = training.choose_fast_path(pargs, sft, margs)
    model, tokenizer, base_id = training.load_model(pargs, margs, fast)
    rows, _, _ = training.load_examples(pargs, tokenizer.eos_token)
    model = training.add_lora(model, margs, base_id, False)
    trainer = training.build_trainer(model, tokenizer, rows, None, sft, fast, pargs)
    assert (trainer.max_group_tokens, trainer.release_above) == expected


@pytest.mark.parametrize("overrides, message", [({"cpu_group_tokens": -1}, "cpu_group_tokens must be 0 or more"),
                                                ({"cpu_release_above": 0.5}, "cpu_release_above must be above 1")])
def test_bad_cpu_memory_settings_are_refused(tmp_path, data_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, **overrides))])


def test_qlora_4bit_trl_trainer(tmp_path, data_dir):
    from phisum.models import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    recipe = write_recipe(tmp_path, data_dir, profile="none", model_name_or_path=str(tiny), load_in_4bit=True,
                          bnb_4bit_quant_type="nf4", dtype="bfloat16", fast_cpu=False,
                          use_cpu=not torch.cuda.is_available())  # trl's path runs where it runs: the GPU
    trainer, model, before = train_in_process(recipe)
    assert type(trainer).__name__ == "SFTTrainer"
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert_adapter_changed_base_not(model, before)


def test_lora_8bit_paged_adamw8bit_fast_trainer(tmp_path, data_dir):
    from phisum.models import save_tiny

    tiny = save_tiny(tmp_path / "tiny")
    recipe = write_recipe(tmp_path, data_dir, profile="none", model_name_or_path=str(tiny), load_in_8bit=True,
                          optim="paged_adamw_8bit")
    trainer, model, before = train_in_process(recipe)
    optimizer = trainer.optimizer.optimizer  # transformers builds bnb.optim.AdamW(optim_bits=8, is_paged=True)
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.is_paged
    assert optimizer.args.optim_bits == 8
    assert_adapter_changed_base_not(model, before)


def test_fast_loss_equals_trl_loss(tmp_path, data_dir):
    """Same batch, same weights, fp32: completion-only logits give trl's loss exactly."""
    from datasets import Dataset
    from trl import SFTTrainer

    from phisum.fast_trainer import CompletionOnlySFTTrainer

    pargs, sft, margs, model, tokenizer, rows = lora_with_random_b(tmp_path, data_dir, per_device_train_batch_size=4)
    losses = []
    # None: one forward over the padded batch; 0: one forward per row (every row trimmed of padding)
    for cls, unpad in ((SFTTrainer, None), (CompletionOnlySFTTrainer, None), (CompletionOnlySFTTrainer, 0)):
        kwargs = {"autocast_bf16": False, "unpad_overhead_tokens": unpad} if cls is CompletionOnlySFTTrainer else {}
        trainer = cls(model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      **kwargs)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert (batch["labels"] == tokenizer.eos_token_id).any(), "EOS must be a trained label"
        lengths = batch["attention_mask"].sum(1)
        assert lengths.min() < lengths.max(), "the batch must hold padding for the unpadded path to matter"
        if unpad == 0:
            groups = trainer.length_groups(batch["input_ids"], batch["attention_mask"])
            assert len(groups) == len(set(lengths.tolist())) > 1  # rows of equal length share a pass
        model.eval()  # no LoRA dropout: the unpadded passes draw their dropout masks in another order
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(model, batch)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[0] == pytest.approx(losses[2], rel=1e-4)


def test_plan_length_groups():
    from phisum.fast_trainer import plan_length_groups

    lengths = [500, 40, 480, 60, 50, 510]
    # padding costs more than an extra pass: short rows and long rows go apart
    assert plan_length_groups(lengths, overhead_tokens=64) == [[1, 4, 3], [2, 0, 5]]
    assert plan_length_groups(lengths, overhead_tokens=10_000) == [[1, 4, 3, 2, 0, 5]]  # one pass
    assert plan_length_groups(lengths, overhead_tokens=0) == [[1], [4], [3], [2], [0], [5]]
    assert sorted(sum(plan_length_groups([7] * 5, 64), [])) == list(range(5))


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, save_strategy="steps", save_steps=2)
    pargs, sft, margs = parse_recipe(["--config", str(recipe)])
    training.train(pargs, sft, margs, ["--config", str(recipe)])
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    # the first run finished and wrote its adapter: replacing it takes --overwrite like any other run
    pargs, sft, margs = parse_recipe(["--config", str(recipe), "--max_steps", "4", "--resume_from_checkpoint", "true",
                                      "--overwrite", "true"])
    summary = training.train(pargs, sft, margs, [])
    assert summary["steps"] == 4
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[:2] == [1, 2] and steps[-1] == 4  # steps 1-2 come from the checkpoint's history


def test_push_to_hub_needs_repo_id(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir)
    pargs, sft, margs = parse_recipe(["--config", str(recipe), "--push_to_hub", "true"])
    with pytest.raises(ValueError, match="hub_model_id"):
        training.train(pargs, sft, margs, [])


def run_cli(args, tmp_path, timeout=120):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_trains_and_writes_adapter_summary_and_curve(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, eval_strategy="steps", eval_steps=1, adapter_dir=str(tmp_path / "ad"))
    result = run_cli([sys.executable, "-m", "phisum", "train", "--config", str(recipe), "--max_steps", "3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "ad"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "phisum/tiny-phi" and config["r"] == 8
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_eval_loss"] is not None and summary["tokens_per_second"] > 0
    assert "--max_steps 3" in summary["command"] and summary["data"][0]["sha256"]
    assert (adapter / "loss_curve.png").stat().st_size > 1000
    assert not list(adapter.glob("*.bin")) and not (tmp_path / "run" / "checkpoint-3").exists()

    from phisum.adapters import check_adapter
    from phisum.profiles import PROFILES

    check_adapter(adapter, PROFILES["tiny"])


def test_cli_bad_recipe_key_exits_with_message(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, lora_rank=4)
    result = run_cli([sys.executable, "-m", "phisum", "train", "--config", str(recipe)], tmp_path)
    assert result.returncode == 2 and "lora_rank" in result.stderr


def test_process_group_is_destroyed_before_exit(tmp_path):
    # A gloo group left to interpreter shutdown can abort a rank that trained fine (the CI failure of
    # 2026-11-27): main() ends the group itself, on success and on error alike.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    training.end_process_group()
    assert not dist.is_initialized()
    training.end_process_group()  # nothing initialised: a no-op

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    assert training.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert not dist.is_initialized()


@pytest.mark.slow
def test_accelerate_two_processes_one_adapter(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, adapter_dir=str(tmp_path / "ad"), max_steps=2)
    # accelerate 1.15 runs `--cpu --num_processes 2` as ONE process unless mpirun is set up;
    # `--multi_gpu` on a machine without CUDA starts torchrun ranks that train on CPU over gloo.
    result = run_cli(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "phisum", "train",
                      "--config", str(recipe)], tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ad" / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert summary["epochs"] == 1.0  # 2 steps x 2 ranks x batch 2 = all 8 rows (one rank alone: 0.5)
    assert len(list(tmp_path.rglob("adapter_model.safetensors"))) == 1

    from peft import PeftModel

    from phisum.models import build_tiny_model

    PeftModel.from_pretrained(build_tiny_model(), tmp_path / "ad")


def test_recorded_command_never_keeps_a_hub_token():
    from phisum.training_report import _redacted_command

    token = "hf_" + "a" * 34
    command = _redacted_command(["--config", "x.yaml", "--hub_token", token, f"--hub_token={token}"])
    assert token not in command and command.count("***") == 2


# ------------------------------------------------------------------ nothing lost, nothing wasted

def test_an_existing_adapter_is_never_overwritten_without_the_flag(tmp_path, data_dir):
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, adapter_dir=str(adapter)))])
    with pytest.raises(ValueError, match="--overwrite"):
        training.train(pargs, sft, margs, [])
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"the user's adapter"
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, adapter_dir=str(adapter))),
                                      "--overwrite", "true", "--max_steps", "1"])
    training.train(pargs, sft, margs, [])
    assert (adapter / "adapter_model.safetensors").read_bytes() != b"the user's adapter"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ad")] == []  # no temp folders left


@pytest.mark.parametrize("overrides, message", [({"max_steps": 0}, "trains nothing"),
                                                ({"seed": 2**70}, "seed must be")])
def test_runs_that_would_train_nothing_or_crash_are_refused_before_loading(tmp_path, data_dir, overrides, message):
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, **overrides))])
    with pytest.raises(ValueError, match=message):
        training.check_run(pargs, sft)


def test_one_file_source_holds_out_eval_rows_instead_of_evaluating_on_train(tmp_path, data_dir, capsys):
    one = tmp_path / "all.jsonl"
    one.write_text((data_dir / "train.jsonl").read_text() * 3)
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["fname"] = f"row_{i}"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, dataset_source=str(one),
                                                                   eval_fraction=0.3))])
    train, evaluation, _ = training.load_examples(pargs, "<eos>")
    assert evaluation and train and len(train) + len(evaluation) == 24
    assert not {e["prompt"] + e["completion"] for e in evaluation} & {t["prompt"] + t["completion"] for t in train} \
        or len({e["prompt"] for e in evaluation}) < len(evaluation)  # duplicated rows may repeat text
    assert "holding out" in capsys.readouterr().err


def test_resume_skips_a_half_written_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    good, broken = out / "checkpoint-2", out / "checkpoint-4"
    good.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
        (good / name).write_text("{}")
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{}")  # killed while saving: no weights, no optimizer
    _, sft, _ = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir)), "--resume_from_checkpoint", "latest"])
    assert training.resume_checkpoint(sft) == str(good)
    _, sft, _ = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir)), "--resume_from_checkpoint",
                              str(broken)])
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        training.resume_checkpoint(sft)


def one_step_gradients(trainer, model):
    """(loss, {name: grad}) of one training step on the trainer's first batch."""
    model.zero_grad()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(model, batch)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_per_group_backward_gives_the_one_backward_gradients(tmp_path, data_dir):
    """Bounding memory by one backward per length group must not change the gradients."""
    from datasets import Dataset

    from phisum.fast_trainer import CompletionOnlySFTTrainer

    pargs, sft, margs, model, tokenizer, rows = lora_with_random_b(tmp_path, data_dir, lora_dropout=0.0,
                                                                     per_device_train_batch_size=8)
    training.choose_fast_path(pargs, sft, margs)
    grads = []
    for max_group_tokens in (None, 64):  # one backward per batch; one per group of at most 64 tokens
        trainer = CompletionOnlySFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                                           processing_class=tokenizer, max_group_tokens=max_group_tokens,
                                           autocast_bf16=False)
        grads.append(one_step_gradients(trainer, model))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and a.keys() == b.keys() and a
    assert all(torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-4) for n in a)


def test_freed_memory_is_trimmed_on_schedule_and_on_growth(tmp_path, data_dir):
    """Trims follow release_every, and come sooner once RSS passes release_above x its size after the last one."""
    from datasets import Dataset

    from phisum.fast_trainer import CompletionOnlySFTTrainer, resident_bytes

    pargs, sft, margs, model, tokenizer, rows = lora_with_random_b(tmp_path, data_dir, lora_dropout=0.0)
    training.choose_fast_path(pargs, sft, margs)
    assert resident_bytes() > 10 * 2**20

    groups = []

    def trims(**release):
        trainer = CompletionOnlySFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                                           processing_class=tokenizer, autocast_bf16=False, **release)
        plan = trainer.length_groups
        trainer.length_groups = lambda *a: groups.append(len(planned := plan(*a))) or planned
        start = trainer.releases
        for _ in range(4):
            one_step_gradients(trainer, model)
        return trainer.releases - start, trainer.rss_after_release

    assert trims(release_every=0, release_above=None) == (0, None)
    count, rss = trims(release_every=2, release_above=None)
    assert count == 2 and rss > 0
    groups.clear()
    # any RSS passes it: a trim after every group's backward, several in a step, not one per step
    assert trims(release_every=0, release_above=1e-6, max_group_tokens=1)[0] == sum(groups) > 4
    assert trims(release_every=0, release_above=1e6)[0] == 0
    # one backward per batch (as under DDP) is released on the same schedule, not never
    assert trims(release_every=2, release_above=None, max_group_tokens=None)[0] == 2


def test_chunked_head_gives_the_plain_head_gradients(tmp_path, data_dir):
    """The chunked head loss computes the hidden-state gradient in its forward: same gradients."""
    from datasets import Dataset

    from phisum.fast_trainer import CompletionOnlySFTTrainer

    pargs, sft, margs, model, tokenizer, rows = lora_with_random_b(tmp_path, data_dir, lora_dropout=0.0,
                                                                     per_device_train_batch_size=8)
    training.choose_fast_path(pargs, sft, margs)
    grads = []
    for chunked in (False, True):
        trainer = CompletionOnlySFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                                           processing_class=tokenizer, max_group_tokens=64,
                                           autocast_bf16=False, chunked_head=chunked)
        assert (trainer.head_weight is not None) == chunked
        grads.append(one_step_gradients(trainer, model))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and a.keys() == b.keys() and a
    assert all(torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-4) for n in a)


def test_tied_head_shares_one_bf16_embedding_and_keeps_the_loss(tmp_path, data_dir):
    """Gemma ties its head to the input embedding: on a CPU the trainer keeps one bf16 tensor for both
    (the embedding's output cast back to fp32), and the checkpoint file's mapping is let go."""
    import copy

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from phisum.fast_trainer import CompletionOnlySFTTrainer

    pargs, sft, margs = parse_recipe(["--config", str(write_recipe(tmp_path, data_dir, bf16=False))])
    _, tokenizer, _ = training.load_model(pargs, margs, True)
    rows, _, _ = training.load_examples(pargs, tokenizer.eos_token)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = Gemma3ForCausalLM(config)
    base.config._attn_implementation = "eager"
    losses, grads = [], []
    for chunked in (False, True):
        torch.manual_seed(1)  # the same random LoRA weights in both
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0, init_lora_weights=False))
        trainer = CompletionOnlySFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                                           processing_class=tokenizer, chunked_head=chunked)
        embedding = model.get_input_embeddings()
        if chunked:
            assert embedding.weight.dtype == torch.bfloat16
            assert trainer.head_weight.data_ptr() == embedding.weight.data_ptr()  # one tensor, not a copy
            assert embedding(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream stays fp32
        else:
            assert embedding.weight.dtype == torch.float32 and trainer.head_weight is None
        loss, step_grads = one_step_gradients(trainer, model)
        losses.append(loss)
        grads.append(torch.cat([g.flatten() for g in step_grads.values()]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # bf16 rounding of the embedding, no more
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_init_adapter_trains_on_from_an_adapter(tmp_path, data_dir):
    """init_adapter: the run starts from that adapter's weights (not a fresh LoRA) and trains them."""
    from safetensors.torch import load_file

    from tests.conftest import make_tiny_adapter

    start = make_tiny_adapter(tmp_path / "start", trained=True, seed=3)
    initial = load_file(start / "adapter_model.safetensors")
    start_bytes = (start / "adapter_model.safetensors").read_bytes()
    recipe = write_recipe(tmp_path, data_dir, init_adapter=str(start), bf16=False)
    pargs, sft, margs = parse_recipe(["--config", str(recipe)])
    model, _, base_id = training.load_model(pargs, margs, True)
    model = training.add_lora(model, margs, base_id, False, pargs.init_adapter)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(initial) and all(p.requires_grad for p in loaded.values())
    assert all(torch.equal(loaded[n.replace(".weight", ".default.weight")], w) for n, w in initial.items())

    trainer, model, before = train_in_process(recipe)
    assert all(torch.equal(before[n.replace(".weight", ".default.weight")], w) for n, w in initial.items())
    assert_adapter_changed_base_not(model, before)
    assert (start / "adapter_model.safetensors").read_bytes() == start_bytes  # the adapter trained on is left as it was


@pytest.mark.parametrize("problem, message", [
    ("missing", "needs adapter_config.json and adapter_model.safetensors"),
    ("rank", "has r 8 on"),
])
def test_init_adapter_is_refused_before_the_model_loads(tmp_path, data_dir, problem, message):
    from tests.conftest import make_tiny_adapter

    folder = tmp_path / "start"
    if problem == "missing":
        folder.mkdir()
    else:
        make_tiny_adapter(folder, trained=True)
    recipe = write_recipe(tmp_path, data_dir, init_adapter=str(folder), lora_r=4 if problem == "rank" else 8)
    pargs, sft, margs = parse_recipe(["--config", str(recipe)])
    with pytest.raises(ValueError, match=message):
        training.train(pargs, sft, margs, [])
