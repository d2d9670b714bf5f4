"""phisum.models: the CPU attention layout for grouped-query models."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def tiny_gqa_model():
    """A tiny random Gemma 3 whose four query heads share one key/value head (as Gemma 3 270M's do)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              bos_token_id=256, eos_token_id=256, pad_token_id=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 256
    return model


def record_sdpa(monkeypatch):
    """The query shape and enable_gqa of every call to torch's scaled_dot_product_attention."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((tuple(query.shape), bool(kwargs.get("enable_gqa"))))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_cpu_attention_gives_the_same_tokens_with_decode_steps_folded(monkeypatch):
    """A single row (no padding mask: transformers would pass enable_gqa, which the CPU kernel runs
    slowly for one query token) and a padded batch generate the same tokens and nearly the same
    scores as transformers' sdpa (fp32), every decode step folds the query heads onto their
    key/value head, and prompts use enable_gqa instead of copying the key/value heads."""
    from phisum.models import CPU_ATTENTION, use_cpu_attention

    reference = tiny_gqa_model()
    model = copy.deepcopy(reference)
    assert use_cpu_attention(model) and model.config._attn_implementation == CPU_ATTENTION
    calls = record_sdpa(monkeypatch)
    for rows in ([[5, 9, 33, 41, 7, 120, 64]], [[5, 9, 33, 41, 7, 120, 64], [256, 256, 256, 3, 8, 99, 12]]):
        ids = torch.tensor(rows)
        mask = (ids != 256).long()
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "do_sample": False,
                  "return_dict_in_generate": True, "output_scores": True}
        with torch.inference_mode():
            expected = reference.generate(**kwargs)
            del calls[:]
            got = model.generate(**kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        assert torch.allclose(torch.stack(got.scores), torch.stack(expected.scores), atol=1e-4)
        decode = [shape for shape, _ in calls if shape[2] == 4 and shape[1] == 1]  # (batch, kv heads, groups, dim)
        assert len(decode) == 2 * 11  # two layers, every step after the prompt
        assert all(gqa for shape, gqa in calls if shape[2] == 7)  # the prompt: no copied key/value heads
        assert not any(shape[2] == 1 for shape, _ in calls)  # no unfolded single-token query


def test_cpu_attention_is_left_to_models_it_does_not_apply_to():
    from phisum.models import build_tiny_model, use_cpu_attention

    eager = tiny_gqa_model()
    eager.set_attn_implementation("eager")
    assert not use_cpu_attention(eager) and eager.config._attn_implementation == "eager"
    phi = build_tiny_model()  # one key/value head per query head: nothing to fold
    before = phi.config._attn_implementation
    assert not use_cpu_attention(phi) and phi.config._attn_implementation == before
