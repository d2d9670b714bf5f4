"""The model card of a published adapter, built from the folder that is uploaded.

Metadata (ModelCardData): base_model from adapter_config.json, library_name peft, datasets
from the recipe (task or a Hub dataset_source) or the summary, the base model's license,
tags, pipeline_tag text-generation. Body: usage, adapter settings, the recipe YAML, the
training summary and loss curve, and the evaluation report with its plots.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from phisum.profiles import PROFILES
from phisum.tasks import TASKS

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
REPORT_DIRS = ("reports", "report", "eval", "evaluation")


def base_licence(base: str) -> str:
    """The licence id of a base model, from the profile that runs it ('other' when none does)."""
    return next((p.licence for p in PROFILES.values() if p.accepts_base(base)), "other")


def read_recipe(folder: Path) -> tuple[Path | None, dict]:
    """recipe.yaml, else the first YAML beside the adapter; ({} if none or unreadable)."""
    import yaml

    candidates = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    candidates.sort(key=lambda p: p.stem != "recipe")
    for path in candidates:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            return path, data
    return None, {}


def read_summary(folder: Path) -> dict:
    for name in ("training_summary.json", "train_results.json", "all_results.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def card_datasets(recipe: dict, summary: dict, dataset: str | None) -> list[str]:
    if dataset:
        return [dataset]
    source = recipe.get("dataset_source") or summary.get("dataset_source")
    if isinstance(source, str) and REPO_ID.match(source) and not Path(source).exists():
        return [source]
    task = recipe.get("task") or summary.get("task")
    return [TASKS[task].hub_dataset] if task in TASKS else []


def rebase_links(markdown: str, prefix: str) -> str:
    """Relative links in an embedded report point into its folder; demote its headings one level."""
    out, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced:
            line = re.sub(r"\]\((?!https?:|/|#)([^)\s]+)\)", lambda m: f"]({prefix}/{m.group(1)})", line)
            line = "##" + line if line.startswith("#") else line
        out.append(line)
    return "\n".join(out)


def scalar_rows(data: dict, limit: int = 25) -> list[str]:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in data.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) < 120]
    return ["| key | value |", "|---|---|", *rows[:limit]] if rows else []


def evaluation_section(folder: Path, report: Path) -> list[str]:
    """The report's markdown (links pointed into its folder), plots it does not show, and its file list."""
    lines = ["## Evaluation", ""]
    md = sorted(report.rglob("report.md")) or sorted(report.rglob("*.md"))
    for path in md:
        lines += [rebase_links(path.read_text(encoding="utf-8"), path.parent.relative_to(folder).as_posix()), ""]
    shown = {m for p in md for m in re.findall(r"\]\(([^)\s]+\.png)\)", p.read_text(encoding="utf-8"))}
    lines += [f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in sorted(report.rglob("*.png"))
              if p.name not in shown] + [""]
    files = [f"`{p.relative_to(folder).as_posix()}`" for p in sorted(report.rglob("*")) if p.is_file()]
    return lines + [f"Files: {', '.join(files)}", ""]


def build_model_card(folder: Path, repo_id: str, dataset: str | None = None, license: str | None = None):
    """ModelCard for the staged folder: metadata from adapter_config, recipe and summary; body from the files."""
    from huggingface_hub import ModelCard, ModelCardData

    from phisum.config import adapter_env_name

    config = json.loads((folder / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base or base.startswith(("/", ".", "~")) or not REPO_ID.match(base):
        raise ValueError(f"adapter_config.json records base model {base!r}, not a Hub id; set "
                         "base_model_name_or_path to the base's repo id (e.g. microsoft/phi-2)")
    recipe_path, recipe = read_recipe(folder)
    summary = read_summary(folder)
    task = recipe.get("task") or summary.get("task")
    known = TASKS.get(task)
    tags = ["phisum", "peft", "lora", *(known.card_tags if known else ())]
    if recipe.get("load_in_4bit") or recipe.get("load_in_8bit"):
        tags.append("qlora")
    data = ModelCardData(base_model=base, library_name="peft", datasets=card_datasets(recipe, summary, dataset) or None,
                         license=license or base_licence(base), tags=tags, pipeline_tag="text-generation")
    name = repo_id.split("/")[1]
    weights = folder / "adapter_model.safetensors"
    targets = config.get("target_modules") or []
    lines = [f"# {name}", "",
             f"A LoRA adapter for [`{base}`](https://huggingface.co/{base}) trained with PhiSUM"
             + (f" for {known.card_text}." if known else "."), "",
             "## Use it", "", "```python", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'base = AutoModelForCausalLM.from_pretrained("{base}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
             f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", "",
             f"In the PhiSUM app or CLI: `{adapter_env_name(known.adapter if known else 'dialogsum')}={repo_id}` "
             f"(append `@<revision>` to pin one).", "",
             "## Adapter", "", "| | |", "|---|---|",
             f"| rank r | {config.get('r')} |", f"| lora_alpha | {config.get('lora_alpha')} |",
             f"| lora_dropout | {config.get('lora_dropout')} |",
             f"| target modules | {', '.join(sorted(targets)) if isinstance(targets, list) else targets} |",
             f"| adapter_model.safetensors | {weights.stat().st_size / 2**20:.2f} MB |", ""]
    if recipe_path:
        lines += ["## Training recipe", "", f"`{recipe_path.name}`:", "", "```yaml",
                  recipe_path.read_text(encoding="utf-8").rstrip(), "```", ""]
    training_md = folder / "TRAINING.md"
    if summary or training_md.exists() or list(folder.glob("*.png")):
        lines += ["## Training summary", ""]
        lines += [rebase_links(training_md.read_text(encoding="utf-8"), "."), ""] if training_md.exists() else []
        lines += [f"Command: `{summary['command']}`", ""] if isinstance(summary.get("command"), str) else []
        sources = summary.get("data") if isinstance(summary.get("data"), list) else []
        lines += [f"- data: {d['report']}" for d in sources if isinstance(d, dict) and isinstance(d.get("report"), str)]
        lines += [""] if sources else []
        lines += [*scalar_rows(summary), ""] if summary and not training_md.exists() else []
        lines += [f"![{p.stem}]({p.name})" for p in sorted(folder.glob("*.png"))] + [""]
    for report in (folder / sub for sub in REPORT_DIRS if (folder / sub).is_dir()):
        lines += evaluation_section(folder, report)
    lines += ["## Limitations", "",
              "A small adapter on a small base model: outputs can be wrong, incomplete or invented. "
              "Check summaries against the source before relying on them.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
