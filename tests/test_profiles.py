import dataclasses

import pytest
import torch

from phisum.config import from_env
from phisum.models import build_tiny_model, build_tiny_tokenizer, default_dtype
from phisum.profiles import PROFILES, Profile, get_profile, register_profile, resolve_profile


def test_auto_picks_embedded_on_cpu_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile, reason = resolve_profile("auto")
    assert profile.name == "embedded" and "no CUDA" in reason


def test_auto_backend_follows_the_workload_on_a_cpu(monkeypatch):
    """One request's latency: llama.cpp; many rows at once (evaluate): the micro-batching transformers."""
    pytest.importorskip("xllamacpp", reason="auto picks llama.cpp only where xllamacpp is installed")
    from phisum.backends import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    embedded = PROFILES["embedded"]
    assert choose_backend("auto", embedded)[0] == "llamacpp"
    name, why = choose_backend("auto", embedded, workload="batch")
    assert name == "transformers" and "batch work" in why
    assert choose_backend("llamacpp", embedded, workload="batch")[0] == "llamacpp"  # an explicit choice stands
    assert choose_backend("auto", embedded, "http://127.0.0.1:8000", workload="batch")[0] == "openai"
    with pytest.raises(ValueError, match="unknown workload 'bulk'"):
        choose_backend("auto", embedded, workload="bulk")


def test_explicit_and_unknown_profiles():
    assert resolve_profile("tiny", "PHISUM_PROFILE") == (PROFILES["tiny"], "profile 'tiny' from PHISUM_PROFILE")
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("llama")


def test_phi2_targets_are_named_explicitly():
    assert PROFILES["phi2"].lora_target_modules == ("q_proj", "k_proj", "v_proj", "dense")
    assert PROFILES["phi2"].base_model == "microsoft/phi-2"


def test_embedded_targets_match_the_committed_adapters():
    import json
    from pathlib import Path

    for config in Path("assets/adapters/embedded").glob("*/adapter_config.json"):
        targets = set(json.loads(config.read_text())["target_modules"])
        assert targets == set(PROFILES["embedded"].lora_target_modules), config


def test_adapter_overrides_come_from_the_environment_through_config():
    settings = from_env({"PHISUM_ADAPTER_DIALOGSUM": "user/phi2-dialogsum@v1",
                         "PHISUM_ADAPTER_DIALOGSUM_QUICK": "user/quick"})
    sources = PROFILES["phi2"].adapter_sources(settings.adapters)
    assert sources["dialogsum"] == "user/phi2-dialogsum@v1" and sources["dialogsum-quick"] == "user/quick"


def test_profiles_carry_their_dtype_rule():
    assert default_dtype(PROFILES["tiny"], "cpu") == torch.float32
    assert default_dtype(PROFILES["embedded"], "cpu") == torch.bfloat16


def test_a_toy_profile_registers_in_a_few_lines_and_loads():
    """A new base is one record; models.load_base and the backends read its fields."""
    from phisum.backends import load_backend

    toy = register_profile(dataclasses.replace(PROFILES["tiny"], name="toy", description="a renamed tiny base",
                                               context_length=256))
    try:
        assert get_profile("toy") is toy and isinstance(toy, Profile)
        backend = load_backend("toy", "transformers", {}, progress=False)
        assert backend.context_length == 256 and backend.describe()["profile"] == "toy"
    finally:
        PROFILES.pop("toy")


def test_tiny_model_is_deterministic_and_tokenizer_round_trips():
    a, b = build_tiny_model(), build_tiny_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    tok = build_tiny_tokenizer()
    text = "#Person1#: Grüße! 你好\n### Human: hi"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id == 256 and tok.padding_side == "left"
