"""The chunked cross-entropy through a frozen head gives the plain path's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from phisum.head_loss import chunked_head_loss, logits_are_head_output


def reference(hidden, weight, targets, softcap, bias=None):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])  # phi-2's head has a bias, Gemma's none
@pytest.mark.parametrize("chunk_elements", [1, 200, 1 << 20])  # one row per chunk, a few rows, all at once
def test_chunked_loss_and_gradient_match_plain_cross_entropy(softcap, with_bias, chunk_elements):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64)
    bias = torch.randn(50, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 50, (13,))
    loss = chunked_head_loss(hidden, weight, targets, softcap, bias, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad(3.0 * loss, hidden)  # the upstream gradient scales it
    expected = reference(hidden, weight, targets, softcap, bias)
    (expected_grad,) = torch.autograd.grad(3.0 * expected, hidden)
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_no_gradient_kept_without_grad():
    hidden, weight = torch.randn(4, 8), torch.randn(50, 8)
    with torch.no_grad():
        loss = chunked_head_loss(hidden, weight, torch.tensor([1, 2, 3, 4]))
    assert loss.grad_fn is None and float(loss) == pytest.approx(float(reference(hidden, weight,
                                                                               torch.tensor([1, 2, 3, 4]), None)))


def test_probe_accepts_plain_heads_and_refuses_post_processed_logits():
    from phisum.models import load_base
    from phisum.profiles import get_profile

    model, _ = load_base(get_profile("tiny"), dtype=torch.float32, device="cpu", progress=False)
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    assert logits_are_head_output(model, head, None)
    assert not logits_are_head_output(model, head, 2.0)  # phi applies no softcap: the logits differ
    handle = model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out.logits * 2))
    try:  # a model that scales its logits after the head (Cohere, Granite) keeps the plain path
        assert not logits_are_head_output(model, head, None)
    finally:
        handle.remove()
    head.weight.requires_grad_(True)  # a trained head needs its own gradient: plain path
    assert not logits_are_head_output(model, head, None)
