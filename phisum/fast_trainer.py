"""A faster SFTTrainer for CPUs: logits only where the loss is, a few rows at a time.

trl's SFTTrainer builds the LM head output over the whole vocabulary at every
position and then walks it again for entropy/accuracy metrics; with Gemma's
262k-token vocabulary that dominates a CPU step. Completion-only training only
needs the head at completion positions, so this subclass gathers the final
hidden states there (a pre-hook on the output embedding, which keeps the call
going through DDP/peft wrappers) and runs lm_head + cross-entropy on those rows
alone, under bf16 autocast with fp32 master weights; a frozen head goes through
phisum.head_loss in chunks, so no vocabulary-wide block of logits outlives its
chunk. Same loss definition as trl (sum over completion tokens / tokens in the
accumulated batch).

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

from phisum.allocator import keep_freed_memory, release_freed_memory, resident_bytes
from phisum.head_loss import chunked_head_loss, final_logit_softcap, logits_are_head_output


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


def store_tied_embedding_in_bf16(model):
    """A frozen fp32 input embedding that is also the output head -> bf16, its output cast back to
    fp32 (the residual stream stays fp32); returns the bf16 weight, or None when not tied.

    Autocast computes the head in bf16 anyway, so one bf16 tensor serves both, instead of an fp32
    embedding plus a bf16 copy for the head. The looked-up rows are rounded to bf16 (and Gemma's
    embedding scale is applied in bf16, as in a bf16 model at inference)."""
    inner = getattr(model, "module", model)
    embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if embedding is None or head is None or embedding.weight is not head.weight or embedding.weight.requires_grad:
        return None
    if embedding.weight.dtype == torch.float32:
        embedding.weight.data = embedding.weight.data.to(torch.bfloat16)
    if not getattr(embedding, "_phisum_fp32_output", False):
        embedding.register_forward_hook(lambda module, args, output: output.float())
        embedding._phisum_fp32_output = True
    return embedding.weight.detach() if embedding.weight.dtype == torch.bfloat16 else None


def copy_file_backed_weights(model) -> None:
    """Copy the frozen fp32 parameters and buffers left after the bf16 conversions (norms, biases)
    into memory of their own. Loaded weights live in a mapping of the checkpoint file, which stays
    mapped, with every page ever read counted in RSS, while any tensor still points into it."""
    for module in model.modules():
        for _, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is not None and tensor.dtype == torch.float32 and not tensor.requires_grad:
                tensor.data = tensor.data.clone()


class CompletionOnlySFTTrainer(SFTTrainer):
    """SFTTrainer whose loss computes the LM head only where labels != -100."""

    def __init__(self, *args, autocast_bf16: bool = True, unpad_overhead_tokens: int | None = 64,
                 max_group_tokens: int | None = 1536, release_every: int = 8, release_above: float | None = 1.5,
                 keep_memory: bool = True, chunked_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        on_cpu = self.args.device.type == "cpu"
        # Freed memory is trimmed every `release_every` steps (0: never), and sooner once RSS passes
        # `release_above` times the RSS right after the previous trim (None: no such check): the
        # memory kept for reuse grows with the shapes a run meets, so a fixed interval alone lets
        # a long run's peaks climb where short benchmarks never see it.
        self.release_every = release_every if on_cpu else 0
        self.release_above = release_above if on_cpu else None
        self.releases = 0  # trims so far (benchmarks and tests read it)
        self.rss_after_release = None
        if keep_memory and on_cpu:
            keep_freed_memory()
        self.autocast_bf16 = autocast_bf16
        self.unpad_overhead_tokens = unpad_overhead_tokens  # None: one forward over the padded batch
        self.max_group_tokens = max_group_tokens  # None: one backward per batch (all groups' graphs alive)
        cpu_autocast = autocast_bf16 and on_cpu
        self.head_weight = self.head_bias = None
        self.softcap = final_logit_softcap(self.model)
        head = output_head(self.model)
        if chunked_head and logits_are_head_output(self.model, head, self.softcap):
            # bf16 copies made once, where autocast would cast the fp32 (tied) weight in every group;
            # a head tied to the input embedding becomes that embedding, stored in bf16
            tied = store_tied_embedding_in_bf16(self.model) if cpu_autocast else None
            cast = (lambda t: t.detach().to(torch.bfloat16)) if cpu_autocast else (lambda t: t.detach())
            self.head_weight = tied if tied is not None else cast(head.weight)
            self.head_bias = cast(head.bias) if head.bias is not None else None
        if cpu_autocast:
            store_frozen_linears_in_bf16(self.model)
            copy_file_backed_weights(self.model)
        self.trained_tokens = 0  # tokens through forward+backward on this rank
        self.steps_since_release = 0
        if self.release_every or self.release_above:
            self._release_freed_memory()  # the RSS the growth check compares against

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The whole batch's loss in one graph (evaluation, and training under DDP)."""
        labels = inputs["labels"]
        count = self._loss_denominator(labels, num_items_in_batch)
        loss = sum(self._group_loss(model, inputs, rows, length) for rows, length in
                   self.length_groups(inputs["input_ids"], inputs.get("attention_mask"))) / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it like trl does
        if model.training:
            self._count_trained_tokens(inputs)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward one length group at a time, then hand freed memory back when due.

        Each group's activations are freed by its own backward, so peak memory follows the
        largest group (at most `max_group_tokens` padded tokens), not the batch; gradients
        add up across groups exactly as across accumulation steps. DDP keeps one backward
        per step (its gradient hooks fire once), so it goes through compute_loss."""
        if self.accelerator.num_processes > 1 or self.max_group_tokens is None:
            total = super().training_step(model, inputs, num_items_in_batch)
        else:
            total = self._step_by_groups(model, inputs, num_items_in_batch)
        self.steps_since_release += 1
        if (self.release_every and self.steps_since_release >= self.release_every) or self._grown_past_bound():
            self._release_freed_memory()
        return total

    def _step_by_groups(self, model, inputs, num_items_in_batch):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        count = self._loss_denominator(inputs["labels"], num_items_in_batch)
        if num_items_in_batch is None:  # a per-batch mean: scale for accumulation like Trainer does
            count = count * self.current_gradient_accumulation_steps
        total = torch.zeros((), device=inputs["input_ids"].device)
        groups = self.length_groups(inputs["input_ids"], inputs.get("attention_mask"))
        for index, (rows, length) in enumerate(groups):
            with self.compute_loss_context_manager():
                loss = self._group_loss(model, inputs, rows, length) / count
            self.accelerator.backward(loss)
            total += loss.detach()
            # Checked between groups too: each group leaves freed memory in shapes of its own, and
            # within one step of several groups that piles up past the bound before the step ends.
            if index < len(groups) - 1 and self._grown_past_bound():
                self._release_freed_memory()
        self._count_trained_tokens(inputs)
        return total

    def _grown_past_bound(self) -> bool:
        if self.release_above and self.rss_after_release:
            rss = resident_bytes()
            return rss is not None and rss > self.release_above * self.rss_after_release
        return False

    def evaluate(self, *args, **kwargs):
        """Evaluation and checkpoint saves run beside the training state with shapes of their
        own; freed memory is returned before and after them too, not only after steps."""
        self._release_freed_memory()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._release_freed_memory()

    def _save_checkpoint(self, model, trial):
        self._release_freed_memory()
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._release_freed_memory()

    def _release_freed_memory(self) -> None:
        if self.release_every or self.release_above:
            release_freed_memory()
            self.releases += 1
            self.steps_since_release = 0
            self.rss_after_release = resident_bytes()

    def _loss_denominator(self, labels, num_items_in_batch):
        """trl's: tokens in the accumulated batch when given, else this batch's completion tokens."""
        if num_items_in_batch is not None:
            return torch.as_tensor(num_items_in_batch, device=labels.device).clamp(min=1)
        return (labels[:, 1:] != -100).sum().clamp(min=1)

    def _group_loss(self, model, inputs, rows, length):
        """Summed cross-entropy of one group of rows, trimmed to `length` tokens."""
        labels = inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        head = output_head(model)
        device = inputs["input_ids"].device.type
        autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                    if self.autocast_bf16 and device == "cpu" else nullcontext())
        ids, sub_labels = inputs["input_ids"][rows, :length], labels[rows, :length]
        sub_mask = attention_mask[rows, :length] if attention_mask is not None else None
        shifted = sub_labels[:, 1:]
        positions = shifted != -100

        states = []

        def gather_completion_states(module, args):
            # (batch, seq, hidden) -> (completion tokens, hidden): the head sees only those rows,
            # or none when the chunked loss below runs the head itself.
            gathered = args[0][:, :-1][positions]
            if self.head_weight is None:
                return (gathered,)
            states.append(gathered)
            return (gathered[:0],)

        handle = head.register_forward_pre_hook(gather_completion_states)
        try:
            with autocast:
                outputs = model(input_ids=ids, attention_mask=sub_mask, use_cache=False)
        finally:
            handle.remove()
        if self.head_weight is not None:
            return chunked_head_loss(states[0], self.head_weight, shifted[positions], self.softcap, self.head_bias)
        # model-side softcapping (Gemma) is already applied to these logits
        return F.cross_entropy(outputs.logits.float(), shifted[positions], reduction="sum")

    def _count_trained_tokens(self, inputs) -> None:
        attention_mask = inputs.get("attention_mask")
        tokens = int(attention_mask.sum()) if attention_mask is not None else inputs["labels"].numel()
        self.trained_tokens += tokens
        self._total_train_tokens += tokens * self.accelerator.num_processes
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def length_groups(self, input_ids, attention_mask) -> list[tuple[torch.Tensor, int]]:
        """(row indices, length) per forward pass: the batch split so that little compute goes to padding.

        A collated batch is padded to its longest row; on a CPU every pad token costs as much
        as a real one. Rows are cut into groups of similar length, each trimmed to its own
        longest row and holding at most `max_group_tokens` padded tokens (a longer row goes
        alone), which bounds the activations training_step keeps alive at once. Only for
        right-padded batches in a single process: DDP allows one forward per backward."""
        whole = [(torch.arange(input_ids.shape[0]), input_ids.shape[1])]
        if attention_mask is None or self.unpad_overhead_tokens is None or self.accelerator.num_processes > 1 \
                or not bool(attention_mask[:, 0].all()):
            return whole
        lengths = attention_mask.sum(dim=1).tolist()
        return [(torch.tensor(rows), max(lengths[r] for r in rows))
                for rows in plan_length_groups(lengths, self.unpad_overhead_tokens, self.max_group_tokens)]


def plan_length_groups(lengths: list[int], overhead_tokens: int, max_tokens: int | None = None) -> list[list[int]]:
    """Rows sorted by length and cut into consecutive groups minimising padded tokens plus
    `overhead_tokens` per extra forward pass (op dispatch, smaller matmuls); exact DP.
    A group of several rows holds at most `max_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(end):
            padded = (end - begin) * lengths[order[end - 1]]
            if max_tokens is not None and end - begin > 1 and padded > max_tokens:
                continue
            cost = best[begin] + padded + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class ThroughputCallback(TrainerCallback):
    """Wall time of the training loop (without evaluation) for a tokens/s figure, and, every
    `every` steps, one progress line with the rate and an ETA: a background run's log then
    says how far it is and when it will end (tqdm's bar is unreadable in a log file)."""

    def __init__(self, every: int = 0, log=None):
        self.step_seconds: list[float] = []
        self.every, self.log = every, log
        self._step_start = None
        self._first_step = None

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()
        if self._first_step is None:
            self._first_step = state.global_step  # a resumed run starts past 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
            self._step_start = None
        if self.every and self.log and state.global_step % self.every == 0:
            self.log(progress_line(state.global_step, state.max_steps, self.step_seconds))


def progress_line(step: int, total: int, step_seconds: list[float]) -> str:
    """'step 120/1558 (7.7%), 4.1 s/step, trained 8:12, ETA 1:38:20' from the recent step times."""
    recent = step_seconds[-50:]
    per_step = sum(recent) / len(recent) if recent else 0.0
    left = max(total - step, 0) * per_step

    def clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    share = f" ({100 * step / total:.1f}%)" if total else ""
    return (f"step {step}/{total}{share}, {per_step:.1f} s/step, trained {clock(sum(step_seconds))}, "
            f"ETA {clock(left)}")
