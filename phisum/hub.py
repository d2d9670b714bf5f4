"""Publish a trained adapter to the Hugging Face Hub with a model card.

  python -m phisum push --adapter outputs/dialogsum/adapter --repo-id USER/NAME
                        [--private] [--revision BRANCH] [--report DIR] [--dataset HUB_ID]
                        [--license ID] [--message TEXT] [--dry-run OUT_DIR]

The upload is an explicitly built folder: the adapter (adapter_config.json,
adapter_model.safetensors), tokenizer files, the recipe YAML, the training summary,
plots, the evaluation report (a reports/ or eval/ subfolder, or --report DIR) and a
generated README.md card. Checkpoints, optimizer states, pickles, .env files and
anything named like a token never leave the machine. --dry-run writes that exact
folder to OUT_DIR and lists it instead of uploading.

Token: HF_TOKEN, or the one saved by `hf auth login`. Exit codes: 0 ok, 1 Hub or
network failure, 2 bad input, missing or rejected token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from phisum.model_card import REPO_ID, REPORT_DIRS, build_model_card

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
SUMMARY_FILES = ("training_summary.json", "TRAINING.md", "train_results.json", "eval_results.json",
                 "all_results.json")
REPORT_SUFFIXES = (".md", ".json", ".jsonl", ".png", ".csv")
TEXT_RECORDS = (".md", ".json", ".jsonl", ".csv")
MAX_REPORT_FILE = 20 * 2**20  # predictions files beyond this are left out, not the whole report
# Defence in depth behind the allow-list: these are refused wherever they sit.
FORBIDDEN = {
    "checkpoint-*": "trainer checkpoint", "training_args*": "pickled training arguments",
    "*.bin": "pickled weights", "*.pt": "pickle", "*.pth": "pickle", "*.pkl": "pickle", "*.pickle": "pickle",
    "*.ckpt": "pickle", "optimizer*": "optimizer state", "scheduler*": "scheduler state", "rng_state*": "RNG state",
    ".env*": "environment file", "*.env": "environment file", "*token*": "may hold a token",
    "*secret*": "may hold a secret", "*.key": "key file", "*.pem": "key file", "__pycache__": "bytecode",
    "*.pyc": "bytecode", ".git": "git metadata",
}
# Access tokens are hf_ + 34 letters/digits; anything shaped like one blocks the upload.
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
SECRET_KEY_LINE = re.compile(r"^(\s*[\w.-]*(?:token|secret|password)[\w.-]*\s*:\s*)(?!null\b|~|''|\"\"|$)(\S.*)$",
                             re.IGNORECASE | re.MULTILINE)

NO_TOKEN = ("no Hugging Face token found: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`")
REJECTED = ("the Hub rejected the token (HTTP {status}): it is invalid, expired or lacks write access{where}. "
            "Create a write token at https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login`")


class PublishError(Exception):
    """A clean, token-free message for the user and the exit code the CLI returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Staged:
    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source path, why)

    def listing(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [f"{size:>12,}  {path}" for path, size in self.files]
        lines.append(f"{total:>12,}  total, {len(self.files)} files")
        lines += [f"   left out:  {path} ({why})" for path, why in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------ tokens and errors

def known_token(token: str | None = None) -> str | None:
    """Explicit token, else HF_TOKEN, else the saved login (dry runs redact it too, so they match a push)."""
    from huggingface_hub import get_token

    return token or os.environ.get("HF_TOKEN") or get_token()


def resolve_token(token: str | None = None) -> str:
    token = known_token(token)
    if not token:
        raise PublishError(NO_TOKEN, exit_code=2)
    return token


def scrub(text: str, token: str | None = None) -> str:
    if token:
        text = text.replace(token, "***")
    return TOKEN_SHAPE.sub(b"hf_***", text.encode()).decode()


def explain_hub_error(exc: BaseException, action: str, token: str | None, where: str = "") -> PublishError:
    """Turn a huggingface_hub/httpx failure into one line; never the raw error (it can carry headers)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, PublishError):
        return exc
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishError(f"{action}: HF_HUB_OFFLINE is set; unset it to publish", exit_code=2)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return PublishError(REJECTED.format(status=status, where=where), exit_code=2)
        detail = scrub(str(exc.server_message or "").splitlines()[0] if exc.server_message else "", token)
        return PublishError(f"{action} failed: HTTP {status}{': ' + detail[:300] if detail else ''}")
    first_line = scrub((str(exc).splitlines() or [""])[0], token)[:300]
    return PublishError(f"{action} failed: {type(exc).__name__}{': ' + first_line if first_line else ''}")


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"--repo-id must look like USER/NAME, got {repo_id!r}", exit_code=2)


# ------------------------------------------------------------------ staging

def forbidden_reason(rel: PurePosixPath) -> str | None:
    for part in rel.parts:
        if part in TOKENIZER_FILES:
            continue  # tokenizer files contain "token" in their names, not tokens
        for pattern, why in FORBIDDEN.items():
            if fnmatch(part.lower(), pattern):
                return why
    return None


def walk(folder: Path):
    """Relative posix paths of every file under folder, without descending into forbidden folders."""
    for dirpath, dirnames, filenames in os.walk(folder):
        base = PurePosixPath(Path(dirpath).relative_to(folder).as_posix())
        pruned = [d for d in dirnames if forbidden_reason(base / d)]
        dirnames[:] = sorted(d for d in dirnames if d not in pruned)
        yield from (base / d for d in pruned)  # reported as skipped, never entered
        yield from (base / name for name in sorted(filenames))


def classify_adapter_file(rel: PurePosixPath) -> str | None:
    """Where an adapter-folder file goes in the repo, or None if it is not on the allow-list."""
    name, top = rel.name, len(rel.parts) == 1
    if top and (name in ADAPTER_FILES or name in TOKENIZER_FILES or name in SUMMARY_FILES
                or rel.suffix in (".yaml", ".yml", ".png")):
        return rel.as_posix()
    if len(rel.parts) > 1 and rel.parts[0] in REPORT_DIRS and rel.suffix in REPORT_SUFFIXES:
        return rel.as_posix()
    return None


def copy_file(src: Path, dest: Path, redact: str | None = None) -> None:
    """Copy; YAML keys that hold tokens or secrets are blanked on the way. With `redact` (the token,
    or "" for token-shaped strings only), text records such as training_summary.json's command line
    lose their tokens instead of blocking the upload."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix in (".yaml", ".yml"):
        text = src.read_text(encoding="utf-8")
        text = SECRET_KEY_LINE.sub(r"\1null  # removed by phisum push", text)
        dest.write_text(scrub(text, redact) if redact is not None else text, encoding="utf-8")
    elif redact is not None and src.suffix in TEXT_RECORDS:
        dest.write_text(scrub(src.read_text(encoding="utf-8", errors="replace"), redact), encoding="utf-8")
    else:
        shutil.copyfile(src, dest)


def recipe_from_command(summary_file: Path) -> Path | None:
    """The --config YAML named in training_summary.json's command, when the training wrote no copy."""
    import shlex

    try:
        argv = shlex.split(json.loads(summary_file.read_text(encoding="utf-8")).get("command") or "")
    except (OSError, ValueError, AttributeError):
        return None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value and value.endswith((".yaml", ".yml")):
            from phisum.profiles import ROOT

            for candidate in (Path(value), ROOT / value):
                if candidate.is_file():
                    return candidate
    return None


@contextmanager
def dry_run_folder(out_dir: str | Path):
    """A new or empty folder for a dry run; emptied again if staging fails, so a rerun works."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir} is not empty; give --dry-run a new or empty folder", exit_code=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield out_dir
    except BaseException:
        for child in out_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def check_staged_for_tokens(staged: Staged, token: str | None) -> None:
    needle = token.encode() if token else None
    for path, _ in staged.files:
        data = (staged.folder / path).read_bytes()
        if (needle and needle in data) or TOKEN_SHAPE.search(data):
            raise PublishError(f"{path} contains something shaped like a Hugging Face token; "
                               "remove it before publishing", exit_code=2)


def finish_listing(staged: Staged) -> Staged:
    staged.files = sorted((p.relative_to(staged.folder).as_posix(), p.stat().st_size)
                          for p in staged.folder.rglob("*") if p.is_file())
    return staged


def stage_adapter(adapter_dir: str | Path, out_dir: str | Path, repo_id: str, report_dir: str | Path | None = None,
                  dataset: str | None = None, license: str | None = None, token: str | None = None) -> Staged:
    """Build the upload folder from the allow-list and write the model card into it."""
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise PublishError(f"--adapter {adapter_dir} is not a folder", exit_code=2)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        pickled = sorted(p.name for p in adapter_dir.glob("adapter_model*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (found {', '.join(pickled)}: pickled weights are never uploaded; re-save with "
                "save_pretrained(safe_serialization=True))") if pickled else ""
        raise PublishError(f"{adapter_dir} has no {' or '.join(missing)}{hint}; is it a peft adapter folder?",
                           exit_code=2)
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise PublishError(f"{adapter_dir}/adapter_config.json is not valid JSON ({exc.msg})", exit_code=2) from None

    staged = Staged(Path(out_dir))
    sources = [(adapter_dir, None)]
    if report_dir is not None:
        report_dir = Path(report_dir).expanduser()
        if not report_dir.is_dir():
            raise PublishError(f"--report {report_dir} is not a folder", exit_code=2)
        sources.append((report_dir, "reports"))
    for root, prefix in sources:
        for rel in walk(root):
            shown = ((root / rel).as_posix() if prefix else rel.as_posix()) + "/" * (root / rel).is_dir()
            why = forbidden_reason(rel)
            dest = None
            if not why:
                if prefix:
                    dest = f"{prefix}/{rel.as_posix()}" if rel.suffix in REPORT_SUFFIXES else None
                else:
                    dest = classify_adapter_file(rel)
                why = None if dest else ("replaced by the generated card" if rel.as_posix() == "README.md"
                                         else "not on the allow-list")
            if dest and (root / rel).stat().st_size > MAX_REPORT_FILE and dest.startswith(REPORT_DIRS):
                dest, why = None, f"over {MAX_REPORT_FILE // 2**20} MB"
            if dest:
                copy_file(root / rel, staged.folder / dest, redact=token or "")
            else:
                staged.skipped.append((shown, why))
    has_recipe = any(staged.folder.glob("*.y*ml"))
    if not has_recipe and (recipe := recipe_from_command(adapter_dir / "training_summary.json")):
        copy_file(recipe, staged.folder / "recipe.yaml", redact=token or "")
    try:
        card = build_model_card(staged.folder, repo_id, dataset=dataset, license=license)
    except ValueError as exc:
        raise PublishError(str(exc), exit_code=2) from None
    (staged.folder / "README.md").write_text(str(card), encoding="utf-8")
    finish_listing(staged)
    check_staged_for_tokens(staged, token)
    return staged


# ------------------------------------------------------------------ upload

def push_adapter(adapter_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                 dry_run_dir: str | Path | None = None, report_dir: str | Path | None = None,
                 commit_message: str | None = None, revision: str | None = None, dataset: str | None = None,
                 license: str | None = None, endpoint: str | None = None) -> str | Path:
    """Stage and upload an adapter; returns the commit URL, or the folder for a dry run.

    Raises PublishError with a message that never contains the token.
    """
    check_repo_id(repo_id)
    if dry_run_dir is not None:
        with dry_run_folder(dry_run_dir) as out:
            staged = stage_adapter(adapter_dir, out, repo_id, report_dir, dataset, license, known_token(token))
        print(staged.listing())
        return staged.folder
    token = resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="phisum-push-") as tmp:
        staged = stage_adapter(adapter_dir, Path(tmp), repo_id, report_dir, dataset, license, token)
        print(staged.listing(), file=sys.stderr)
        message = scrub(commit_message or f"Upload LoRA adapter from {Path(adapter_dir).name}", token)
        return upload_staged(staged.folder, repo_id, token, private=private, revision=revision,
                             commit_message=message,
                             endpoint=endpoint)


def upload_staged(folder: Path, repo_id: str, token: str, private: bool = False, revision: str | None = None,
                  commit_message: str = "Upload with phisum", repo_type: str | None = None,
                  endpoint: str | None = None, space_sdk: str | None = None, before_upload=None) -> str:
    """create_repo(exist_ok) [+ branch] + upload_folder. `before_upload(api)` runs between the two."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    step = f"creating {repo_type or 'model'} repo {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
        if revision and revision != "main":
            step = f"creating branch {revision!r} in {repo_id}"
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        if before_upload is not None:
            step = f"configuring {repo_id}"
            before_upload(api)
        step = f"uploading to {repo_id}"
        print(f"[phisum] {step}{'@' + revision if revision else ''} ...", file=sys.stderr)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, repo_type=repo_type)
    except Exception as exc:
        raise explain_hub_error(exc, step, token, where=f" to {repo_id.split('/')[0]}") from None
    return str(getattr(info, "commit_url", None) or info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phisum push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder written by training")
    parser.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", "--branch", dest="revision", default=None,
                        help="branch to push to (created from main if missing)")
    parser.add_argument("--report", default=None, help="evaluation folder (report.md, metrics.json, rouge.png)")
    parser.add_argument("--dataset", default=None, help="Hub dataset id for the card (default: from the recipe)")
    parser.add_argument("--license", default=None, help="license id for the card (default: the base model's)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--dry-run", metavar="OUT_DIR", default=None,
                        help="write the folder that would be uploaded to OUT_DIR and list it; upload nothing")
    args = parser.parse_args(argv)
    try:
        result = push_adapter(args.adapter, args.repo_id, private=args.private, dry_run_dir=args.dry_run,
                              report_dir=args.report, commit_message=args.message, revision=args.revision,
                              dataset=args.dataset, license=args.license)
    except PublishError as exc:
        print(f"error: {scrub(str(exc), os.environ.get('HF_TOKEN'))}", file=sys.stderr)
        return exc.exit_code
    if args.dry_run:
        print(f"dry run: nothing uploaded; the folder above is {result}", file=sys.stderr)
    else:
        print(f"pushed: {result}")
    return 0
