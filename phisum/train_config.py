"""The phisum part of a training recipe; trl's SFTConfig and ModelConfig hold the rest.

A recipe YAML is parsed by `trl.TrlParser((PhisumArguments, SFTConfig, ModelConfig))`,
the same dataclasses the command line fills, so any key can be overridden with
`--key value` and an unknown key fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phisum.profiles import PROFILES
from phisum.tasks import TASKS


@dataclass
class PhisumArguments:
    """Which data and base the run uses and where the adapter goes.

    Args:
        profile: a phisum profile (phi2, embedded, tiny). When model_name_or_path is the
            profile's base (or unset), the base loads the profile's way (the embedded GGUF
            cache, the in-code tiny model, the Hub) and the adapter records the profile's
            base id; None loads `model_name_or_path` with from_pretrained.
        task: a phisum task (dialogsum, oasst, xsum); picks the loader and the prompt template.
        dataset_source: local file/folder or Hub dataset id (None: the task's Hub dataset).
        train_split / eval_split: splits to read. When both come from one file (the same
            split, or a single-file source), eval_fraction of it is held out instead.
        eval_fraction: share held out for evaluation when one file holds both.
        oasst_lang: keep only oasst trees in this language (empty: all languages).
        max_train_samples / max_eval_samples: cut the data (0 = all), for smoke runs.
        adapter_dir: where the final adapter, summary and loss curve are written
            (default: <output_dir>/adapter). Checkpoints stay in output_dir.
        overwrite: replace an existing adapter_dir (otherwise the run refuses to start).
        init_adapter: start from this peft adapter's weights instead of a fresh LoRA (another
            epoch, more data); its rank and targets must be the recipe's.
        fast_cpu: completion-only-logits trainer; None = automatically on CPU.
        cpu_group_tokens: the fast CPU trainer runs one forward+backward per length group of at
            most this many padded tokens, so only one group's activations are alive at a time
            (0: one backward per batch, every group's graph alive).
        cpu_release_above: the fast CPU trainer hands freed memory back to the system every 8
            steps, and sooner once RSS passes this multiple of its level after the last release,
            checked after each group's backward (0: on the schedule only).
    """

    profile: str | None = field(default=None, metadata={"help": f"{', '.join(PROFILES)}, or none to use "
                                                                 "model_name_or_path"})
    task: str = field(default="dialogsum", metadata={"help": f"one of {', '.join(TASKS)}"})
    dataset_source: str | None = field(default=None, metadata={"help": "local file/folder or Hub dataset id"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str | None = field(default="validation", metadata={"help": "split to evaluate on (none: no eval)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "oasst: share of trees held out if splits match"})
    oasst_lang: str = field(default="en", metadata={"help": "oasst: language of the trees kept ('' = all)"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first N training examples (0 = all)"})
    max_eval_samples: int = field(default=0, metadata={"help": "use only the first N eval examples (0 = all)"})
    adapter_dir: str | None = field(default=None, metadata={"help": "final adapter folder (default output_dir/adapter)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing adapter_dir"})
    init_adapter: str | None = field(default=None, metadata={"help": "train on from this adapter's weights "
                                                                     "(same rank and targets), not a fresh LoRA"})
    fast_cpu: bool | None = field(default=None, metadata={"help": "fast CPU trainer (default: on when no CUDA)"})
    cpu_group_tokens: int = field(default=1536, metadata={"help": "fast CPU trainer: padded tokens per "
                                                                 "forward+backward group (0: one per batch)"})
    cpu_release_above: float = field(default=1.5, metadata={"help": "fast CPU trainer: release freed memory once "
                                                                     "RSS passes this multiple of its last low "
                                                                     "(0: every 8 steps only)"})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.profile in ("", "none", "None"):
            self.profile = None
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)} or none, got {self.profile!r}")
        if self.eval_split in ("", "none", "None"):
            self.eval_split = None
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.cpu_group_tokens < 0:
            raise ValueError(f"cpu_group_tokens must be 0 or more, got {self.cpu_group_tokens}")
        if self.cpu_release_above and self.cpu_release_above <= 1:
            raise ValueError(f"cpu_release_above must be above 1 (or 0: off), got {self.cpu_release_above}")


def build_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    return TrlParser((PhisumArguments, SFTConfig, ModelConfig))


def parse_recipe(argv: list[str]):
    """(phisum_args, sft_config, model_config) from `--config X.yaml` plus overrides.

    Without CUDA, `use_cpu` defaults to true: TrainingArguments otherwise refuses
    the recipes' bf16 on a CPU, and bf16 autocast is what makes CPU training fast.
    """
    import torch

    import yaml

    argv = list(argv)
    if not torch.cuda.is_available() and not any(a.split("=")[0] == "--use_cpu" for a in argv):
        argv += ["--use_cpu", "true"]
    parser = build_parser()

    def refuse(message):  # argparse would print its usage block and exit; main prints this one line
        raise ValueError(message)

    parser.error = refuse
    try:
        return parser.parse_args_and_config(args=argv)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}: {getattr(exc, 'problem', 'syntax error')})" if mark else ""
        raise ValueError(f"the recipe is not valid YAML{where}") from None
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            raise
        raise ValueError("the command line or recipe has an error (argparse's line above names it)") from None
