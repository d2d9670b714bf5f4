"""Every recipe parses into the CLI's dataclasses; unknown keys fail; flags override."""

from pathlib import Path

import pytest

from phisum.train_config import parse_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "phisum" / "recipes").rglob("*.yaml"))
EXPECTED = {"dialogsum/phi2_lora_8bit.yaml", "dialogsum/phi2_lora_fp16.yaml", "oasst1/phi2_qlora.yaml",
            "xsum/phi2_qlora.yaml", "dialogsum/embedded_cpu.yaml", "oasst1/embedded_cpu.yaml",
            "dialogsum/embedded_cpu_full.yaml", "dialogsum/embedded_cpu_full_epoch2.yaml"}


def test_all_issue_recipes_exist():
    found = {str(p.relative_to(p.parent.parent)) for p in RECIPES}
    assert EXPECTED <= found, EXPECTED - found


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe):
    text = recipe.read_text()
    for header in ("# Model arguments", "# LoRA arguments", "# Data arguments", "# SFT trainer config"):
        assert header in text, f"{recipe.name} lacks the section {header!r}"
    pargs, sft, model = parse_recipe(["--config", str(recipe)])
    assert model.use_peft and model.lora_r > 0 and model.lora_target_modules
    assert sft.output_dir and pargs.task in ("dialogsum", "oasst", "xsum")
    # a recipe never writes into the committed adapters: that needs an explicit --adapter_dir
    assert not str(pargs.adapter_dir or "").startswith("assets"), pargs.adapter_dir
    assert sft.activation_checkpointing is not None  # set explicitly: no deprecated-alias warning
    if pargs.profile == "phi2":
        # peft's phi defaults (q_proj, v_proj, fc1, fc2) are not what the issue asks for.
        assert set(model.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "dense"}
        assert not sft.fp16, "phi-2 overflows in fp16"


def test_phi2_8bit_recipe_values():
    pargs, sft, model = parse_recipe(["--config", str(next(p for p in RECIPES if p.name == "phi2_lora_8bit.yaml"))])
    assert (model.lora_r, model.lora_alpha, model.lora_dropout, model.load_in_8bit) == (64, 32, 0.05, True)
    assert (sft.learning_rate, sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == (2e-4, 4, 4)
    assert (sft.max_steps, sft.warmup_steps, sft.eval_steps, sft.save_steps) == (1000, 100, 25, 25)
    assert sft.optim == "paged_adamw_8bit" and sft.activation_checkpointing


def test_xsum_recipe_values():
    pargs, sft, model = parse_recipe(["--config", str(next(p for p in RECIPES if p.parent.name == "xsum"))])
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and (model.lora_r, model.lora_alpha) == (16, 32)
    assert sft.lr_scheduler_type == "cosine" and sft.max_length == 1126 and sft.num_train_epochs == 3
    assert (sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == (2, 8)


def test_command_line_overrides_recipe():
    recipe = next(p for p in RECIPES if p.name == "phi2_lora_8bit.yaml")
    _, sft, model = parse_recipe(["--config", str(recipe), "--max_steps", "10", "--lora_r", "8"])
    assert sft.max_steps == 10 and model.lora_r == 8


def test_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: tiny\nuse_peft: true\noutput_dir: out\nlora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank"):
        parse_recipe(["--config", str(bad)])


def test_bad_task_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: poetry\noutput_dir: out\n")
    with pytest.raises(ValueError, match="task must be one of"):
        parse_recipe(["--config", str(bad)])


def test_malformed_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: tiny\nuse_peft: [true\noutput_dir: out\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_recipe(["--config", str(bad)])


def test_recipes_parse_without_deprecation_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for recipe in RECIPES:
            parse_recipe(["--config", str(recipe)])
