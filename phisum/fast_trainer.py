"""A faster SFTTrainer for CPUs: logits only where the loss is.

trl's SFTTrainer builds the LM head output over the whole vocabulary at every
position and then walks it again for entropy/accuracy metrics; with Gemma's
262k-token vocabulary that dominates a CPU step. Completion-only training only
needs the head at completion positions, so this subclass gathers the final
hidden states there (a pre-hook on the output embedding, which keeps the call
going through DDP/peft wrappers) and runs lm_head + cross-entropy on those rows
alone, under bf16 autocast with fp32 master weights. Same loss definition as trl
(sum over completion tokens / tokens in the accumulated batch).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer


def output_head(model):
    """The module that maps hidden states to vocabulary logits (through DDP/peft)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embedding; the fast trainer needs a causal LM head")
    return head


class CompletionOnlySFTTrainer(SFTTrainer):
    """SFTTrainer whose loss computes the LM head only where labels != -100."""

    def __init__(self, *args, autocast_bf16: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_bf16 = autocast_bf16
        self.trained_tokens = 0  # tokens through forward+backward on this rank
        self.completion_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        shifted = labels[:, 1:]
        mask = shifted != -100
        head = output_head(model)

        def gather_completion_states(module, args):
            # (batch, seq, hidden) -> (completion tokens, hidden): the head sees only those rows.
            return (args[0][:, :-1][mask],)

        handle = head.register_forward_pre_hook(gather_completion_states)
        device = inputs["input_ids"].device.type
        autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                    if self.autocast_bf16 and device == "cpu" else nullcontext())
        try:
            with autocast:
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                use_cache=False)
        finally:
            handle.remove()
        logits = outputs.logits.float()  # model-side softcapping (Gemma) already applied
        loss = F.cross_entropy(logits, shifted[mask], reduction="sum")
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it like trl does
        if mode == "train":
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else labels.numel()
            self.trained_tokens += tokens
            self.completion_tokens += int(mask.sum())
            self._total_train_tokens += tokens * self.accelerator.num_processes
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"loss": loss}) if return_outputs else loss


class ThroughputCallback(TrainerCallback):
    """Wall time of the training loop (without evaluation) for a tokens/s figure."""

    def __init__(self):
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self._step_start = None
        self._eval_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.train_seconds += time.perf_counter() - self._step_start
            self._step_start = None

    def on_prediction_step(self, args, state, control, **kwargs):
        self._eval_start = self._eval_start or time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._eval_start is not None:
            self.eval_seconds += time.perf_counter() - self._eval_start
            self._eval_start = None
