"""Cross-entropy through a frozen LM head, a few rows of logits at a time.

The head of a model with a large vocabulary (Gemma: 262,144 tokens) turns every
completion token into a vocabulary-wide row of logits, and a plain
`cross_entropy(head(h))` keeps several such rows alive per token until the backward:
the bf16 logits, their fp32 copy, the saved log-softmax and, in the backward, the
gradient in fp32 and bf16. For a group of a few hundred completion tokens that is
the largest block of a CPU training step's memory, and its size changes with every
group, so the allocator maps and unmaps it again and again.

When the head is frozen (LoRA never trains it) its weight needs no gradient, so the
gradient with respect to the hidden states can be computed in the forward, chunk by
chunk (softmax minus one-hot, times the weight), and only that (tokens x hidden) is
kept. Same numbers as autocast's path: bf16 matmuls, fp32 softmax.
"""

from __future__ import annotations

import torch


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum over rows of -log softmax(softcap(h @ W.T + b))[target]; W and b frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, softcap: float | None):
        exact = torch.promote_types(weight.dtype, torch.float32)  # softmax in fp32 at least
        total = torch.zeros((), dtype=exact, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(weight.dtype)
            target = targets[start:start + chunk, None]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(exact)
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, target)).sum()
            if grad is not None:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                if capped is not None:
                    probs.mul_(1 - capped * capped)
                grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def chunked_head_loss(hidden, weight, targets, softcap: float | None = None, bias=None,
                      chunk_elements: int = 1 << 26):
    """Summed cross-entropy of `hidden` (tokens x hidden) through a frozen head `weight` (vocab x hidden)
    and `bias`, in chunks of about `chunk_elements` logits. A chunk reads the whole weight twice
    (logits, then the gradient), so chunks are as large as the memory allows: a typical group's
    completion tokens fit in one."""
    chunk = max(1, chunk_elements // max(int(weight.shape[0]), 1))
    return ChunkedHeadCrossEntropy.apply(hidden, weight, bias, targets, chunk, softcap)


def final_logit_softcap(model) -> float | None:
    config = getattr(getattr(model, "module", model), "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "final_logit_softcapping", None)


def logits_are_head_output(model, head, softcap: float | None) -> bool:
    """Whether the model's logits are exactly its head's output (after `softcap`).

    Checked on a 4-token forward rather than by model type: models that scale or shift
    logits after the head (Cohere's logit_scale, Granite's logits_scaling, ...) fail it
    and keep the plain path, where the model applies whatever it does."""
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        return False
    seen = {}
    handle = head.register_forward_hook(lambda module, args, output: seen.update(out=output.detach()))
    try:
        with torch.no_grad():
            ids = torch.arange(1, 5, device=head.weight.device)[None]
            logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    if "out" not in seen or seen["out"].shape != logits.shape:
        return False
    expected = seen["out"].float()
    if softcap:
        expected = torch.tanh(expected / softcap) * softcap
    return bool(torch.allclose(logits, expected, rtol=1e-4, atol=1e-4))
