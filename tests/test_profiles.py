import pytest
import torch

from phisum.profiles import PROFILES, build_tiny_model, build_tiny_tokenizer, resolve_profile


def test_auto_picks_embedded_on_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv("PHISUM_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile, reason = resolve_profile("auto")
    assert profile.name == "embedded" and "no CUDA" in reason


def test_environment_and_unknown_profiles(monkeypatch):
    monkeypatch.setenv("PHISUM_PROFILE", "tiny")
    assert resolve_profile(None)[0].name == "tiny"
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("llama")


def test_phi2_targets_are_named_explicitly():
    assert PROFILES["phi2"].lora_target_modules == ("q_proj", "k_proj", "v_proj", "dense")
    assert PROFILES["phi2"].base_model == "microsoft/phi-2"


def test_adapter_sources_from_environment(monkeypatch):
    monkeypatch.setenv("PHISUM_ADAPTER_DIALOGSUM", "user/phi2-dialogsum@v1")
    assert PROFILES["phi2"].adapter_sources()["dialogsum"] == "user/phi2-dialogsum@v1"


def test_tiny_model_is_deterministic_and_tokenizer_round_trips():
    a, b = build_tiny_model(), build_tiny_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    tok = build_tiny_tokenizer()
    text = "#Person1#: Grüße! 你好\n### Human: hi"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id == 256 and tok.padding_side == "left"
