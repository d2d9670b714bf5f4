"""What the transformers backend does to peft's LoRA layers around a model call.

Both change modules every caller shares, so the backend holds its lock around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from phisum.generation import BASE


def plain_lora_layers(model, name: str) -> list:
    """The LoRA layers of adapter `name` if every one is plain LoRA (result + B(A(x)) * s,
    B without a bias, not merged); [] otherwise (DoRA and other variants, embeddings), where
    only peft's own per-row routing is exact."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)
              and (name in m.lora_A or name in getattr(m, "lora_embedding_A", {}))]
    plain = all(name in m.lora_A and type(m.lora_A[name]) is torch.nn.Linear and m.lora_B[name].bias is None
                and name not in getattr(m, "lora_variant", {}) and not m.merged for m in layers)
    return layers if plain else []


@contextmanager
def masked_by_row(model, layers: list, systems: Sequence[str]):
    """Base rows and one adapter's rows in one batch (a before/after click): the adapter is
    active for every row and its update is zeroed on the base rows, by multiplying each
    lora_A output by a 0/1 row mask. Base rows then get their base output exactly (B(0) = 0
    for the plain LoRA layers `plain_lora_layers` returns).

    peft's `adapter_names` splits the rows by adapter inside every LoRA layer at every step
    (indexing, casts, matmuls and an index_put per adapter, built from Python lists): small
    operations whose fixed cost outweighs a 2-row decode step's LoRA arithmetic."""
    name = next(s for s in systems if s != BASE)
    weight = layers[0].lora_A[name].weight
    mask = torch.tensor([s == name for s in systems], dtype=weight.dtype, device=weight.device).view(-1, 1, 1)
    model.set_adapter(name)
    hooks = [layer.lora_A[name].register_forward_hook(lambda _module, _args, out: out.mul_(mask))
             for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def bf16_copies(layers: list, name: str) -> list:
    """(parameter, its fp32 data, a bf16 copy) for adapter `name`'s fp32 LoRA weights in layers
    whose base weight is bf16; for `swapped_in`."""
    return [(param, param.data, param.data.to(torch.bfloat16))
            for layer in layers if layer.get_base_layer().weight.dtype == torch.bfloat16
            for param in (layer.lora_A[name].weight, layer.lora_B[name].weight) if param.dtype == torch.float32]


@contextmanager
def swapped_in(copies: list):
    """The copies' data in place of each parameter's for the block, the original after."""
    for param, _, copy in copies:
        param.data = copy
    try:
        yield
    finally:
        for param, original, _ in copies:
            param.data = original
