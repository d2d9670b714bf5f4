"""Deploy this project as a Gradio Space on the Hugging Face Hub.

  python -m phisum deploy-space --repo-id USER/NAME [--private] [--hardware t4-small]
                                [--dialogsum-adapter USER/REPO[@REV]] [--oasst-adapter USER/REPO[@REV]]
                                [--profile phi2] [--dry-run OUT_DIR]

Uploads app.py, requirements.txt, README.md (its front matter must say sdk: gradio,
app_file: app.py), the phisum/ package and assets/, nothing else (no __pycache__,
outputs, checkpoints, pickles, .env or token files). The adapter flags become the Space
variables PHISUM_ADAPTER_DIALOGSUM / PHISUM_ADAPTER_OASST that the app reads, --profile
becomes PHISUM_PROFILE. --dry-run writes the exact upload folder to OUT_DIR and lists it.

Token: HF_TOKEN, or the one saved by `hf auth login`. Exit codes: 0 ok, 1 Hub or
network failure, 2 bad input, missing or rejected token.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
import tempfile
from pathlib import Path, PurePosixPath

from phisum.hub import (
    PublishError,
    Staged,
    check_repo_id,
    check_staged_for_tokens,
    copy_file,
    dry_run_folder,
    finish_listing,
    forbidden_reason,
    known_token,
    resolve_token,
    scrub,
    upload_staged,
    walk,
)

ROOT = Path(__file__).resolve().parent.parent
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
SPACE_DIRS = ("phisum", "assets")
ADAPTER_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
def _space_profiles() -> tuple[str, ...]:
    from phisum.profiles import PROFILES as registered

    # profiles `auto` can pick are the ones meant for serving; test-only ones (tiny) are not
    return ("auto", *(name for name, p in registered.items() if p.auto))


PROFILES = _space_profiles()


def check_space_readme(path: Path) -> dict:
    """The Space's front matter, parsed the way the Hub reads it; refuses what would not build."""
    from huggingface_hub import SpaceCard

    if not path.is_file():
        raise PublishError(f"{path} is missing; a Space needs a README.md with front matter", exit_code=2)
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise PublishError(f"{path} has no front matter (a first line '---')", exit_code=2)
    try:
        meta = SpaceCard(text).data.to_dict()
    except Exception as exc:  # yaml errors, non-mapping metadata
        raise PublishError(f"{path}: front matter does not parse ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})", exit_code=2) from None
    problems = []
    if meta.get("sdk") != "gradio":
        problems.append(f"sdk is {meta.get('sdk')!r}, expected 'gradio'")
    if meta.get("app_file", "app.py") != "app.py":
        problems.append(f"app_file is {meta.get('app_file')!r}, expected 'app.py'")
    if not meta.get("title"):
        problems.append("title is missing")
    if problems:
        raise PublishError(f"{path} front matter: {'; '.join(problems)}", exit_code=2)
    try:  # metadata, not `import gradio`: that takes seconds
        installed = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed and meta.get("sdk_version") and str(meta["sdk_version"]) != installed:
        print(f"[phisum] note: README sdk_version {meta['sdk_version']} differs from the installed gradio "
              f"{installed}", file=sys.stderr)
    return meta


def space_variables(dialogsum: str | None = None, oasst: str | None = None, profile: str | None = None) -> dict:
    """Space variables the app reads (phisum.config)."""
    variables = {}
    for name, spec in (("dialogsum", dialogsum), ("oasst", oasst)):
        if spec is None:
            continue
        if not ADAPTER_SPEC.match(spec) or Path(spec).exists():
            raise PublishError(f"--{name}-adapter must be a Hub repo id USER/REPO or USER/REPO@REVISION "
                               f"(a Space cannot read local folders), got {scrub(spec)!r}", exit_code=2)
        variables[f"PHISUM_ADAPTER_{name.upper()}"] = spec
    if profile is not None:
        if profile not in PROFILES:
            raise PublishError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}", exit_code=2)
        variables["PHISUM_PROFILE"] = profile
    return variables


def check_hardware(hardware: str | None) -> None:
    from huggingface_hub import SpaceHardware

    flavors = [h.value for h in SpaceHardware]
    if hardware is not None and hardware not in flavors:
        raise PublishError(f"--hardware must be one of {', '.join(flavors)}, got {hardware!r}", exit_code=2)


def stage_space(root: str | Path, out_dir: str | Path, token: str | None = None) -> Staged:
    root = Path(root).resolve()
    check_space_readme(root / "README.md")
    missing = [name for name in ("app.py", "phisum/__init__.py") if not (root / name).is_file()]
    if missing:
        raise PublishError(f"{root} is not a PhiSUM checkout: {', '.join(missing)} missing", exit_code=2)
    staged = Staged(Path(out_dir))
    candidates = [PurePosixPath(name) for name in SPACE_FILES if (root / name).is_file()]
    for folder in SPACE_DIRS:
        if (root / folder).is_dir():
            candidates += [PurePosixPath(folder) / rel for rel in walk(root / folder)]
    for rel in candidates:
        why = forbidden_reason(rel)
        if why:
            staged.skipped.append((rel.as_posix() + "/" * (root / rel).is_dir(), why))
        else:
            copy_file(root / rel, staged.folder / rel.as_posix())
    finish_listing(staged)
    check_staged_for_tokens(staged, token)
    return staged


def deploy_space(repo_id: str, root: str | Path = ROOT, private: bool = False, token: str | None = None,
                 dry_run_dir: str | Path | None = None, hardware: str | None = None,
                 variables: dict[str, str] | None = None, commit_message: str | None = None,
                 endpoint: str | None = None) -> str | Path:
    """Stage and upload the Space; returns the commit URL, or the folder for a dry run."""
    check_repo_id(repo_id)
    check_hardware(hardware)
    variables = dict(variables or {})
    if dry_run_dir is not None:
        with dry_run_folder(dry_run_dir) as out:
            staged = stage_space(root, out, known_token(token))
        print(staged.listing())
        for key, value in variables.items():
            print(f"would set Space variable {key}={value}")
        if hardware:
            print(f"would request hardware {hardware}")
        return staged.folder
    token = resolve_token(token)

    def configure(api) -> None:
        # Before the upload, so the build the upload triggers already sees them.
        for key, value in variables.items():
            api.add_space_variable(repo_id, key, value, description="set by python -m phisum deploy-space")
            print(f"[phisum] Space variable {key}={value}", file=sys.stderr)
        if hardware:
            api.request_space_hardware(repo_id, hardware)
            print(f"[phisum] requested hardware {hardware}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="phisum-space-") as tmp:
        staged = stage_space(root, Path(tmp), token)
        print(staged.listing(), file=sys.stderr)
        return upload_staged(staged.folder, repo_id, token, private=private, repo_type="space", space_sdk="gradio",
                             commit_message=scrub(commit_message or "Deploy PhiSUM Space", token), endpoint=endpoint,
                             before_upload=configure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phisum deploy-space", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", required=True, help="USER/NAME of the Space")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--hardware", default=None, help="Space hardware flavor, e.g. cpu-basic, t4-small, zero-a10g")
    parser.add_argument("--dialogsum-adapter", default=None, help="USER/REPO[@REV] for PHISUM_ADAPTER_DIALOGSUM")
    parser.add_argument("--oasst-adapter", default=None, help="USER/REPO[@REV] for PHISUM_ADAPTER_OASST")
    parser.add_argument("--profile", default=None, choices=PROFILES, help="sets PHISUM_PROFILE in the Space")
    parser.add_argument("--root", default=str(ROOT), help="project folder to deploy (default: this checkout)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--dry-run", metavar="OUT_DIR", default=None,
                        help="write the folder that would be uploaded to OUT_DIR and list it; upload nothing")
    args = parser.parse_args(argv)
    try:
        variables = space_variables(args.dialogsum_adapter, args.oasst_adapter, args.profile)
        result = deploy_space(args.repo_id, root=args.root, private=args.private, dry_run_dir=args.dry_run,
                              hardware=args.hardware, variables=variables, commit_message=args.message)
    except PublishError as exc:
        print(f"error: {scrub(str(exc), os.environ.get('HF_TOKEN'))}", file=sys.stderr)
        return exc.exit_code
    if args.dry_run:
        print(f"dry run: nothing uploaded; the folder above is {result}", file=sys.stderr)
    else:
        print(f"deployed: {result}")
        print(f"Space: https://huggingface.co/spaces/{args.repo_id}")
    return 0
