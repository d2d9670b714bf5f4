"""A faster SFTTrainer for CPUs: logits only where the loss is.

trl's SFTTrainer builds the LM head output over the whole vocabulary at every
position and then walks it again for entropy/accuracy metrics; with Gemma's
262k-token vocabulary that dominates a CPU step. Completion-only training only
needs the head at completion positions, so this subclass gathers the final
hidden states there (a pre-hook on the output embedding, which keeps the call
going through DDP/peft wrappers) and runs lm_head + cross-entropy on those rows
alone, under bf16 autocast with fp32 master weights. Same loss definition as trl
(sum over completion tokens / tokens in the accumulated batch).

Under bf16 autocast the frozen base Linear weights are stored in bf16 up front:
autocast would round them to bf16 before every matmul anyway (same numbers, same
losses), so this only removes a cast of every base weight on every step and
halves their memory. Trainable (LoRA) weights stay fp32.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves blocks above its mmap threshold (32 MB at most) with
    fresh mmaps and unmaps them on free. A CPU training step allocates and frees
    hundreds of such blocks (activations, logits, gradients), so every step the
    kernel faults in and zero-fills gigabytes again: measured here, 40% of the
    process's CPU time was system time. Serving blocks up to `limit` from the
    heap and never trimming it keeps those pages mapped: 1.5x trained tokens/s
    on Gemma 3 270M with identical losses (benchmarks/train_throughput.py), for
    10-20% more peak RSS (15 -> 18 GB for the DialogSum recipe). Process-wide; a
    no-op (False) off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc < 2.35 caps the mmap threshold at 32 MB on 64-bit: fall back to the cap.
    ok = bool(mallopt(m_mmap_threshold, limit) or mallopt(m_mmap_threshold, 32 << 20))
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and ok


def output_head(model):
    """The module that maps hidden states to vocabulary logits (through DDP/peft)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embedding; the fast trainer needs a causal LM head")
    return head


def store_frozen_linears_in_bf16(model) -> int:
    """Frozen plain nn.Linear weights -> bf16; returns how many. The output head is left
    alone: it is tied to the input embedding, and a bf16 embedding would turn the whole
    fp32 residual stream into bf16. Quantized layers (bnb subclasses) are left alone too."""
    head = output_head(model)
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head and module.weight.dtype == torch.float32 \
                and not any(p.requires_grad for p in module.parameters()):
            module.to(torch.bfloat16)
            count += 1
    return count


class CompletionOnlySFTTrainer(SFTTrainer):
    """SFTTrainer whose loss computes the LM head only where labels != -100."""

    def __init__(self, *args, autocast_bf16: bool = True, unpad_overhead_tokens: int | None = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_bf16 = autocast_bf16
        self.unpad_overhead_tokens = unpad_overhead_tokens  # None: one forward over the padded batch
        if autocast_bf16 and self.args.device.type == "cpu":
            store_frozen_linears_in_bf16(self.model)
        self.trained_tokens = 0  # tokens through forward+backward on this rank

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        head = output_head(model)
        device = inputs["input_ids"].device.type
        autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                    if self.autocast_bf16 and device == "cpu" else nullcontext())
        logits, targets = [], []
        for rows, length in self.length_groups(inputs["input_ids"], attention_mask):
            ids, sub_labels = inputs["input_ids"][rows, :length], labels[rows, :length]
            sub_mask = attention_mask[rows, :length] if attention_mask is not None else None
            shifted = sub_labels[:, 1:]
            positions = shifted != -100

            def gather_completion_states(module, args, positions=positions):
                # (batch, seq, hidden) -> (completion tokens, hidden): the head sees only those rows.
                return (args[0][:, :-1][positions],)

            handle = head.register_forward_pre_hook(gather_completion_states)
            try:
                with autocast:
                    outputs = model(input_ids=ids, attention_mask=sub_mask, use_cache=False)
            finally:
                handle.remove()
            logits.append(outputs.logits.float())  # model-side softcapping (Gemma) already applied
            targets.append(shifted[positions])
        logits, targets = torch.cat(logits), torch.cat(targets)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        count = len(targets) if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it like trl does
        if mode == "train":
            tokens = int(attention_mask.sum()) if attention_mask is not None else labels.numel()
            self.trained_tokens += tokens
            self._total_train_tokens += tokens * self.accelerator.num_processes
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"loss": loss}) if return_outputs else loss

    def length_groups(self, input_ids, attention_mask) -> list[tuple[torch.Tensor, int]]:
        """(row indices, length) per forward pass: the batch split so that little compute goes to padding.

        A collated batch is padded to its longest row; on a CPU every pad token costs as much
        as a real one. Rows are cut into groups of similar length, each trimmed to its own
        longest row. All groups' graphs are alive until the one backward, so memory is that of
        the batch minus its padding. Only for right-padded batches in a single process: DDP
        allows one forward per backward."""
        whole = [(torch.arange(input_ids.shape[0]), input_ids.shape[1])]
        if attention_mask is None or self.unpad_overhead_tokens is None or self.accelerator.num_processes > 1 \
                or not bool(attention_mask[:, 0].all()):
            return whole
        lengths = attention_mask.sum(dim=1).tolist()
        return [(torch.tensor(rows), max(lengths[r] for r in rows))
                for rows in plan_length_groups(lengths, self.unpad_overhead_tokens)]


def plan_length_groups(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Rows sorted by length and cut into consecutive groups minimising padded tokens plus
    `overhead_tokens` per extra forward pass (op dispatch, smaller matmuls); exact DP."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(end):
            cost = best[begin] + (end - begin) * lengths[order[end - 1]] + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class ThroughputCallback(TrainerCallback):
    """Wall time of the training loop (without evaluation) for a tokens/s figure."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.eval_seconds = 0.0
        self._step_start = None
        self._eval_start = None

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
            self._step_start = None

    def on_prediction_step(self, args, state, control, **kwargs):
        self._eval_start = self._eval_start or time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._eval_start is not None:
            self.eval_seconds += time.perf_counter() - self._eval_start
            self._eval_start = None
