"""`python -m phisum train --config phisum/recipes/<task>/<variant>.yaml [--key value ...]`

One recipe YAML per experiment, parsed by trl's TrlParser into PhisumArguments,
SFTConfig and ModelConfig (unknown keys fail; any key can be overridden on the
command line). LoRA (or QLoRA with load_in_4bit/8bit) through peft; on a CPU the
completion-only-logits trainer (phisum.fast_trainer) is chosen automatically, so
the same recipe runs fast on CPU and unchanged on GPU. Runs under
`accelerate launch` too: checkpoints, logs and the final adapter are written by
the main process only. At the end the adapter, a loss curve (loss_curve.png) and
a summary (training_summary.json) are written to adapter_dir.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("phisum.training")


# ------------------------------------------------------------------ data

def load_examples(pargs, eos_token: str):
    """(train_examples, eval_examples, reports): prompt/completion rows, EOS on every target.

    When train and eval would come from one file (the same split, or a single-file source,
    which every split name reads), eval_fraction of it is held out instead, with a note:
    evaluating on the training data would say nothing."""
    from phisum import data
    from phisum.tasks import get_task

    task = get_task(pargs.task)
    options = {"lang": pargs.oasst_lang or None}
    train_rows, report = task.load(pargs.dataset_source, pargs.train_split, **options)
    reports = [report]
    eval_rows = []
    if pargs.eval_split:
        one_file = pargs.eval_split == pargs.train_split or (
            pargs.dataset_source is not None and Path(str(pargs.dataset_source)).is_file())
        if one_file:
            holdout = task.holdout or data.split_by_key
            train_rows, eval_rows = holdout(train_rows, pargs.eval_fraction)
            print(f"[phisum] train and eval would read one file ({report.source}): holding out "
                  f"{len(eval_rows)} of {len(eval_rows) + len(train_rows)} rows for evaluation "
                  f"(eval_fraction {pargs.eval_fraction})", file=sys.stderr)
            if not eval_rows or not train_rows:
                raise ValueError(f"holding out eval_fraction={pargs.eval_fraction} of {report.source} leaves "
                                 "an empty part; change eval_fraction or give separate train/eval files")
        else:
            eval_rows, eval_report = task.load(pargs.dataset_source, pargs.eval_split, **options)
            reports.append(eval_report)
    train, evaluation = task.examples(train_rows, eos_token), task.examples(eval_rows, eos_token) if eval_rows else []
    if pargs.max_train_samples:
        train = train[:pargs.max_train_samples]
    if pargs.max_eval_samples:
        evaluation = evaluation[:pargs.max_eval_samples]
    return train, evaluation, reports


# ----------------------------------------------------------------- model

def runs_on_cpu(training_args) -> bool:
    """Whether this run trains on the CPU: asked for (`use_cpu`), or no CUDA device."""
    import torch

    return bool(training_args.use_cpu) or not torch.cuda.is_available()


def kbit_device_map(on_cpu: bool):
    """bitsandbytes places the weights at load time: the whole model on this process's own GPU (one
    per rank under accelerate or torchrun), or the CPU."""
    if on_cpu:
        return "cpu"
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(pargs, model_args, on_cpu: bool):
    """(model, tokenizer, base_id): the base in fp32 unless the recipe says otherwise; a quantized
    base is placed on the CPU when `on_cpu` (runs_on_cpu), else on this process's GPU."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phisum.models import DTYPES, load_base, model_path, prepare_tokenizer
    from phisum.profiles import PROFILES

    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    quant = trl.get_quantization_config(model_args)
    profile = PROFILES.get(pargs.profile) if pargs.profile else None
    name = model_args.model_name_or_path
    own_base = profile is not None and name in (None, profile.base_model)
    if own_base and profile.loader == "tiny":
        if quant is not None:
            raise ValueError(f"the in-code {profile.name} model cannot be quantized; save it (models.save_tiny) "
                             "and point model_name_or_path at the folder")
        model, tokenizer = load_base(profile, dtype=dtype, device="cpu", progress=False)
        return model, tokenizer, profile.base_model
    if own_base:
        path = model_path(profile)  # the profile's way: the converted GGUF cache offline, else the Hub id
    elif name:
        path = name
    else:
        raise ValueError(f"set model_name_or_path or a profile ({', '.join(PROFILES)})")
    base_id = profile.base_model if profile is not None and name in (None, profile.base_model) else name
    kwargs = {"dtype": dtype, "revision": model_args.model_revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = kbit_device_map(on_cpu)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    prepare_tokenizer(tokenizer)
    model.config.name_or_path = base_id
    return model, tokenizer, base_id


def check_run(pargs, training_args) -> Path:
    """Refuse, before the model loads, a run that would train nothing or overwrite a user's adapter.
    Returns the adapter folder."""
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise ValueError("max_steps 0 (or num_train_epochs 0) trains nothing; give a positive number of steps, "
                         "or max_steps -1 to train num_train_epochs")
    if not 0 <= int(training_args.seed) < 2**32:
        raise ValueError(f"seed must be from 0 to 2**32 - 1, got {training_args.seed}")
    from phisum.files import check_output_dir

    adapter_dir = Path(pargs.adapter_dir or Path(training_args.output_dir) / "adapter")
    check_output_dir(adapter_dir, pargs.overwrite, flag="adapter_dir", overwrite_flag="--overwrite true")
    return adapter_dir


def save_adapter(trainer, adapter_dir: Path):
    """The final adapter, written beside adapter_dir and renamed into place: a killed save never
    leaves a half-written adapter where the app looks for one."""
    from phisum.files import replace_folder

    with replace_folder(adapter_dir) as tmp:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)


def add_lora(model, model_args, base_id: str, activation_checkpointing: bool, init_adapter: str | None = None):
    """prepare_model_for_kbit_training for quantized bases, then a peft LoRA model: a fresh LoRA
    from the recipe, or, with `init_adapter`, that adapter's weights to train on (another epoch,
    more data) under the rank and targets it was made with, which the recipe must repeat."""
    import trl
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if not model_args.use_peft:
        raise ValueError("phisum trains LoRA adapters: set use_peft: true in the recipe")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)
    model.name_or_path = base_id
    if init_adapter:
        check_init_adapter(Path(init_adapter), model_args, base_id)
        peft_model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        peft_model = get_peft_model(model, trl.get_peft_config(model_args))
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_id  # what phisum.adapters.check_adapter reads
    return peft_model


def check_init_adapter(folder: Path, model_args, base_id: str | None) -> None:
    """Refuse an init_adapter that is not a safetensors peft LoRA of this base (None: not checked
    yet) with the recipe's rank and targets."""
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"init_adapter {folder}: needs adapter_config.json and adapter_model.safetensors "
                         "(pickled weights are not loaded)")
    config = json.loads((folder / "adapter_config.json").read_text())
    if base_id is not None and config.get("base_model_name_or_path") != base_id:
        raise ValueError(f"init_adapter {folder} was trained on {config.get('base_model_name_or_path')!r}, "
                         f"this run's base is {base_id!r}")
    wanted = {"r": model_args.lora_r, "target_modules": sorted(model_args.lora_target_modules or [])}
    found = {"r": config.get("r"), "target_modules": sorted(config.get("target_modules") or [])}
    if wanted != found:
        raise ValueError(f"init_adapter {folder} has r {found['r']} on {found['target_modules']}, the recipe says "
                         f"r {wanted['r']} on {wanted['target_modules']}: make them match")


# --------------------------------------------------------------- trainer

def build_trainer(model, tokenizer, train, evaluation, training_args, fast: bool, pargs=None):
    from datasets import Dataset

    from phisum.fast_trainer import CompletionOnlySFTTrainer, ThroughputCallback

    every = max(int(training_args.logging_steps or 10), 1)
    meter = ThroughputCallback(every=every, log=lambda line: print(f"[phisum] {line}", file=sys.stderr, flush=True))
    cls, extra = CompletionOnlySFTTrainer, {}
    if not fast:
        from trl import SFTTrainer as cls  # noqa: N813
    elif pargs is not None:  # the recipe's memory settings for the CPU trainer
        extra = {"max_group_tokens": pargs.cpu_group_tokens or None, "release_above": pargs.cpu_release_above or None}
    trainer = cls(model=model, args=training_args, train_dataset=Dataset.from_list(train),
                  eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
                  processing_class=tokenizer, callbacks=[meter], **extra)
    trainer.phisum_meter = meter
    return trainer


def report_truncation(trainer, train_rows, eval_rows, reports, max_length) -> None:
    """trl drops examples whose completion falls past max_length; count them, never hide them."""
    for part, rows, dataset in (("train", train_rows, trainer.train_dataset), ("eval", eval_rows, trainer.eval_dataset)):
        dropped = len(rows) - (len(dataset) if dataset is not None else 0)
        if dropped:
            reports[0].bad[f"{part} examples whose prompt fills max_length={max_length}"] += dropped
            print(f"[phisum] {dropped} of {len(rows)} {part} examples dropped: prompt fills max_length={max_length}",
                  file=sys.stderr)
    if not len(trainer.train_dataset):
        raise ValueError(f"no training example fits max_length={max_length}; raise max_length")


def choose_fast_path(pargs, training_args, model_args=None) -> bool:
    fast = pargs.fast_cpu if pargs.fast_cpu is not None else runs_on_cpu(training_args)
    if fast:
        if training_args.activation_checkpointing:
            log.info("fast CPU path: activation checkpointing off (per-group backward bounds memory instead "
                     "of recomputing every layer)")
        # transformers 5 reads `activation_checkpointing`; `gradient_checkpointing` is only its
        # deprecated alias, copied over at construction, so both must be cleared here.
        training_args.gradient_checkpointing = training_args.activation_checkpointing = False
        training_args.train_sampling_strategy = "group_by_length"  # less padding per batch
        if model_args is not None and not model_args.attn_implementation:
            # torch's CPU flash-attention backward is slow for Gemma's 256-wide heads: eager
            # attention trains faster (benchmarks/train_throughput.py, variant phisum-sdpa).
            model_args.attn_implementation = "eager"
    if runs_on_cpu(training_args) and training_args.fp16:
        raise ValueError("fp16 needs a GPU; on CPU use bf16: true (phi-2 overflows in fp16 anyway)")
    return fast


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `latest`/`true` means the newest COMPLETE one in output_dir.

    A run killed while saving leaves a checkpoint folder without its trainer state or
    weights; resuming from it would fail deep inside the Trainer, so it is skipped with a
    note. A named folder that is incomplete is an error naming what is missing."""
    resume = training_args.resume_from_checkpoint
    if not resume or str(resume).lower() in ("false", "none"):
        return None
    if str(resume).lower() in ("true", "latest"):
        root = Path(training_args.output_dir)
        found = sorted((p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]), reverse=True) if root.is_dir() else []
        for folder in found:
            missing = checkpoint_missing(folder)
            if not missing:
                return str(folder)
            print(f"[phisum] skipping {folder.name}: incomplete ({missing})", file=sys.stderr)
        raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {root}")
    missing = checkpoint_missing(Path(resume))
    if missing:
        raise ValueError(f"--resume_from_checkpoint {resume}: not a complete checkpoint ({missing})")
    return str(resume)


def checkpoint_missing(folder: Path) -> str:
    """What a checkpoint folder lacks to resume from, or '' when it is complete."""
    if not folder.is_dir():
        return "no such folder"
    wanted = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        missing.append("a readable trainer_state.json") if "trainer_state.json" not in missing else None
    return ", ".join(missing)


def push_to_hub(adapter_dir: Path, repo_id: str | None, token: str | None, private: bool | None) -> None:
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    try:
        from phisum.hub import push_adapter
    except ImportError as exc:
        raise RuntimeError(f"--push_to_hub needs phisum.hub.push_adapter, which is not available ({exc})") from None
    import inspect

    wanted = {"token": token, "private": private}
    params = inspect.signature(push_adapter).parameters
    push_adapter(adapter_dir, repo_id, **{k: v for k, v in wanted.items() if k in params and v is not None})


# ------------------------------------------------------------------ main

def train(pargs, training_args, model_args, argv: list[str]) -> dict | None:
    start = time.perf_counter()
    fast = choose_fast_path(pargs, training_args, model_args)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the adapter, not the Trainer
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    adapter_dir = check_run(pargs, training_args)
    resume = resume_checkpoint(training_args)  # a missing or half-written checkpoint fails before the model loads
    if pargs.init_adapter:
        check_init_adapter(Path(pargs.init_adapter), model_args, None)  # its base is checked once that is known
    from phisum import allocator

    print(f"[phisum] memory allocator: {allocator.active()} ({allocator.ENV}=jemalloc|system)", file=sys.stderr)
    model, tokenizer, base_id = load_model(pargs, model_args, runs_on_cpu(training_args))
    train_rows, eval_rows, reports = load_examples(pargs, tokenizer.eos_token)
    for report in reports:
        print(f"[phisum] data: {report.summary()}", file=sys.stderr)
    if training_args.eval_strategy != "no" and not eval_rows:
        raise ValueError("eval_strategy is set but there is no eval data; set eval_split or eval_strategy: 'no'")
    model = add_lora(model, model_args, base_id, training_args.activation_checkpointing, pargs.init_adapter)
    trainer = build_trainer(model, tokenizer, train_rows, eval_rows, training_args, fast, pargs)
    report_truncation(trainer, train_rows, eval_rows, reports, training_args.max_length)
    trainer.train(resume_from_checkpoint=resume)
    if not trainer.is_world_process_zero():
        return None
    save_adapter(trainer, adapter_dir)
    from phisum.training_report import plot_losses, summarize_run, write_training_notes

    summary = summarize_run(trainer, reports, argv, train_rows, time.perf_counter() - start, fast)
    summary["adapter_dir"] = str(adapter_dir)
    (adapter_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_losses(trainer.state.log_history, adapter_dir / "loss_curve.png")
    write_training_notes(summary, adapter_dir / "TRAINING.md")
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    if push:
        push_to_hub(adapter_dir, training_args.hub_model_id, training_args.hub_token, training_args.hub_private_repo)
    return summary


def prepare_process(argv: list[str]) -> str | None:
    """Run the command line under jemalloc when the system has it (phisum.allocator); an error
    message for a bad PHISUM_MALLOC. Help needs no allocator."""
    if not argv or {"-h", "--help"} & set(argv):
        return None
    from phisum import allocator

    try:
        allocator.relaunch_under_jemalloc()
    except ValueError as exc:
        return str(exc)
    return None


def end_process_group() -> None:
    """Destroy torch.distributed's process group (accelerate/torchrun ranks) before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can still hold tensors whose release needs the
    GIL, and the rank dies with SIGABRT ("terminate called without an active exception") after a run
    that succeeded (pytorch/pytorch#179291).
    """
    dist = sys.modules.get("torch.distributed")  # never imported torch (--help, bad recipe): nothing to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__.strip())
        print("\nevery SFTConfig/ModelConfig/PhisumArguments field is a --flag; "
              "see `python -m phisum train --config X.yaml --help` for the full list")
        if not argv:
            return 2
    # OMP_WAIT_POLICY is left to the user: PASSIVE helps when other processes hold the
    # cores but slows training on an idle machine, the usual case (README, Training).
    from phisum.train_config import parse_recipe

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        pargs, training_args, model_args = parse_recipe(argv)
        train(pargs, training_args, model_args, argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from phisum.hub import PublishError

        if isinstance(exc, PublishError):  # a rejected token etc.: one clean line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise
    finally:
        end_process_group()
    return 0
