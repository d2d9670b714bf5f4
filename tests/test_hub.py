"""Publishing: the staged adapter folder, its model card, the Space folder, and real uploads to a
local stand-in for the Hub (tests/fake_hub.py).

Uploads run `python -m phisum push|deploy-space` in a subprocess because huggingface_hub reads
HF_ENDPOINT and HF_HUB_DISABLE_XET at import time. Xet is disabled there: the xet protocol
chunks files into a content-addressed store through the Rust hf_xet client, which a test server
cannot stand in for; with it off, huggingface_hub 2.4 uses the Hub's preupload + LFS batch
(basic transfer) + NDJSON commit endpoints, which the fake server implements.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phisum.hub import PublishError, push_adapter
from phisum.model_card import card_datasets
from phisum.space import check_space_readme, deploy_space, space_variables
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "T0k3n" * 7
EXPECTED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "training_summary.json",
            "loss.png", "reports/report.md", "reports/metrics.json", "reports/rouge.png"}
SPACE_README = ("---\ntitle: PhiSUM test\nsdk: gradio\nsdk_version: 6.31.0\napp_file: app.py\n"
                "models:\n  - microsoft/phi-2\n---\n\n# PhiSUM\n")


def make_adapter_folder(src: Path, tiny_adapter: Path) -> Path:
    """A training output folder: the adapter, what should be published, and what never should."""
    shutil.copytree(tiny_adapter, src)
    (src / "recipe.yaml").write_text("# Model arguments\nprofile: tiny\n# Data\ntask: dialogsum\n"
                                     "hub_token: hf_recipeSecret\nlearning_rate: 2.0e-4\n")
    (src / "training_summary.json").write_text(json.dumps({"task": "dialogsum", "train_loss": 1.2345, "steps": 10}))
    (src / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nloss")
    (src / "reports").mkdir()
    (src / "reports" / "report.md").write_text("# dialogsum evaluation\n\n| system | ROUGE-L |\n|---|---|\n"
                                               "| base | 0.20 |\n| dialogsum | 0.31 |\n\n![ROUGE](rouge.png)\n")
    (src / "reports" / "metrics.json").write_text('{"rougeLsum": 0.31}')
    (src / "reports" / "rouge.png").write_bytes(b"\x89PNG\r\n\x1a\nrouge")
    (src / "checkpoint-2").mkdir()
    (src / "checkpoint-2" / "optimizer.pt").write_bytes(b"pickled optimizer")
    (src / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"old weights")
    (src / "training_args.bin").write_bytes(b"pickled args")
    (src / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (src / "hf_token.txt").write_text(TOKEN)
    (src / "notes.txt").write_text("scratch")
    return src


@pytest.fixture
def adapter_folder(tmp_path, tiny_adapters):
    return make_adapter_folder(tmp_path / "run" / "adapter", tiny_adapters["dialogsum"])


def staged_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def hub_env(tmp_path, hub=None, token=TOKEN) -> dict:
    """Environment for a child process that talks to the fake Hub; HF_HOME empty so no saved login."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_cli(args, tmp_path, hub=None, token=TOKEN):
    return subprocess.run([sys.executable, "-m", "phisum", *args], env=hub_env(tmp_path, hub, token),
                          capture_output=True, text=True, timeout=120)


def assert_token_never_sent(hub: FakeHub, token: str = TOKEN) -> None:
    """The token travels in the Authorization header only: not in any body, file or commit message."""
    for request in hub.requests:
        body = request["body"]
        assert token.encode() not in body, request["path"]
        if request["path"].endswith(("/commit/main", "/commit/v1")):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    assert token.encode() not in base64.b64decode(item["value"]["content"])
                assert token not in json.dumps(item["value"].get("summary", ""))
    for repo in hub.repos.values():
        for branch in repo["branches"].values():
            for path, data in branch["files"].items():
                assert token.encode() not in data, path
                assert b"hf_recipeSecret" not in data, path


# ------------------------------------------------------------------ dry run and card

def test_dry_run_folder_holds_only_the_allow_list(adapter_folder, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = push_adapter(adapter_folder, "someone/tiny-dialogsum", dry_run_dir=tmp_path / "out")
    assert staged_files(out) == EXPECTED
    listing = capsys.readouterr().out
    assert "adapter_model.safetensors" in listing and "total, 9 files" in listing
    assert "checkpoint-2/ (trainer checkpoint)" in listing and "training_args.bin (pickled" in listing

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "phisum/tiny-phi"
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["knkarthick/dialogsum"]
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"lora", "summarization"} <= set(card.data.tags)
    assert "![ROUGE](reports/rouge.png)" in card.text and "| dialogsum | 0.31 |" in card.text
    assert "learning_rate: 2.0e-4" in card.text and "train_loss" in card.text and "![loss](loss.png)" in card.text
    assert "hf_recipeSecret" not in card.content
    assert "hf_recipeSecret" not in (out / "recipe.yaml").read_text()
    # peft's own README template is replaced, not merged
    assert "[More Information Needed]" not in card.content


def test_dry_run_adapter_loads_onto_the_tiny_base_unchanged(adapter_folder, tmp_path):
    from phisum import inference
    from phisum.backends import load_backend
    from phisum.generation import GenerationSettings

    out = push_adapter(adapter_folder, "someone/tiny-dialogsum", dry_run_dir=tmp_path / "out")
    backend = load_backend("tiny", "transformers", {"source": str(adapter_folder), "pushed": str(out)},
                           progress=False)
    assert backend.missing == {}
    settings = GenerationSettings(max_new_tokens=8)
    source, pushed, base = (inference.summarize(backend, ["#Person1#: Hi.\n#Person2#: Hello."], system,
                                                settings)[0].text for system in ("source", "pushed", "base"))
    assert pushed == source != base


def test_report_dir_flag_and_dataset_choice(adapter_folder, tmp_path):
    from huggingface_hub import ModelCard

    report = tmp_path / "eval_run"
    shutil.copytree(adapter_folder / "reports", report)
    shutil.rmtree(adapter_folder / "reports")
    (report / "predictions.pt").write_bytes(b"pickle")
    out = push_adapter(adapter_folder, "someone/x", dry_run_dir=tmp_path / "out", report_dir=report,
                       dataset="someone/my-dialogs")
    assert {"reports/report.md", "reports/rouge.png"} <= staged_files(out)
    assert "reports/predictions.pt" not in staged_files(out)
    assert ModelCard.load(out / "README.md").data.datasets == ["someone/my-dialogs"]
    assert card_datasets({"task": "oasst"}, {}, None) == ["OpenAssistant/oasst1"]
    assert card_datasets({"task": "xsum"}, {}, None) == ["EdinburghNLP/xsum"]
    assert card_datasets({"task": "xsum", "dataset_source": "org/news"}, {}, None) == ["org/news"]
    assert card_datasets({}, {"task": "dialogsum"}, None) == ["knkarthick/dialogsum"]


def test_recipe_named_in_the_summary_is_published_and_tokens_redacted(adapter_folder, tmp_path):
    from huggingface_hub import ModelCard

    recipe = next((ROOT / "phisum" / "recipes").rglob("*.yaml"))
    (adapter_folder / "recipe.yaml").unlink()
    command = f"python -m phisum train --config {recipe.relative_to(ROOT)} --max_steps 5 --hub_token {TOKEN}"
    (adapter_folder / "training_summary.json").write_text(json.dumps({"command": command, "steps": 5}))
    out = push_adapter(adapter_folder, "someone/x", dry_run_dir=tmp_path / "out")
    assert (out / "recipe.yaml").read_text().splitlines()[:3] == recipe.read_text().splitlines()[:3]
    card = ModelCard.load(out / "README.md")
    assert "--max_steps 5 --hub_token hf_***" in card.text and TOKEN not in card.content
    assert TOKEN not in (out / "training_summary.json").read_text()


@pytest.mark.parametrize("breakage, message", [
    ("pickle_only", "found adapter_model.bin: pickled weights are never uploaded"),
    ("local_base", "not a Hub id"),
    ("token_in_binary", "shaped like a Hugging Face token"),
    ("bad_repo_id", "USER/NAME"),
])
def test_bad_input_gets_a_clear_error(adapter_folder, tmp_path, breakage, message):
    repo_id = "someone/x"
    if breakage == "pickle_only":
        (adapter_folder / "adapter_model.safetensors").rename(adapter_folder / "adapter_model.bin")
    elif breakage == "local_base":
        config = json.loads((adapter_folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "/home/me/models/phi-2"
        (adapter_folder / "adapter_config.json").write_text(json.dumps(config))
    elif breakage == "token_in_binary":
        (adapter_folder / "loss.png").write_bytes(b"\x89PNG" + TOKEN.encode())
    else:
        repo_id = "just-a-name"
    with pytest.raises(PublishError) as err:
        push_adapter(adapter_folder, repo_id, dry_run_dir=tmp_path / "out")
    assert message in str(err.value) and err.value.exit_code == 2
    assert TOKEN not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # a rerun can reuse it


def test_dry_run_refuses_a_non_empty_folder(adapter_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty"):
        push_adapter(adapter_folder, "someone/x", dry_run_dir=tmp_path / "out")


# ------------------------------------------------------------------ uploads to the fake Hub

def test_push_uploads_exactly_the_dry_run_folder(adapter_folder, tmp_path):
    dry = push_adapter(adapter_folder, "someone/tiny-dialogsum", dry_run_dir=tmp_path / "dry")
    with FakeHub(tokens=[TOKEN]) as hub:
        result = run_cli(["push", "--adapter", str(adapter_folder), "--repo-id", "someone/tiny-dialogsum",
                          "--private"], tmp_path, hub)
        assert result.returncode == 0, result.stderr
        files = hub.files("someone/tiny-dialogsum")
        assert set(files) == EXPECTED
        for path in EXPECTED - {"README.md"}:
            assert files[path] == (dry / path).read_bytes(), path
        assert files["README.md"].startswith(b"---\nbase_model: phisum/tiny-phi\n")
        assert hub.repos["someone/tiny-dialogsum"]["private"] is True
        # the weights went through LFS (preupload said so), small text files inline in the commit
        assert any(r["method"] == "PUT" and r["path"].startswith("/_lfs/") for r in hub.requests)
        commit = next(r for r in hub.requests if r["path"] == "/api/models/someone/tiny-dialogsum/commit/main")
        assert commit["headers"]["authorization"] == f"Bearer {TOKEN}"
        assert_token_never_sent(hub)
    assert TOKEN not in result.stdout + result.stderr
    assert "pushed: " in result.stdout


def test_pinned_revision_round_trips_through_resolve_adapter(tiny_adapters, tmp_path):
    """Push v1 to a branch, another adapter to main; `repo@v1` must fetch v1's weights."""
    from tests.conftest import make_tiny_adapter

    other = make_tiny_adapter(tmp_path / "other", trained=True, seed=7)
    script = ("import sys; from phisum.adapters import AdapterSource, check_adapter, resolve_adapter; "
              "from phisum.profiles import PROFILES; "
              "p = resolve_adapter(AdapterSource.parse('dialogsum', sys.argv[1])); "
              "check_adapter(p, PROFILES['tiny']); print(p)")
    with FakeHub(tokens=[TOKEN]) as hub:
        for source, extra in ((tiny_adapters["dialogsum"], ["--revision", "v1"]), (other, [])):
            result = run_cli(["push", "--adapter", str(source), "--repo-id", "someone/pinned", *extra], tmp_path, hub)
            assert result.returncode == 0, result.stderr
        weights = {}
        for spec in ("someone/pinned@v1", "someone/pinned"):
            got = subprocess.run([sys.executable, "-c", script, spec], env=hub_env(tmp_path, hub, token=None),
                                 capture_output=True, text=True, timeout=120)
            assert got.returncode == 0, got.stderr
            weights[spec] = (Path(got.stdout.strip()) / "adapter_model.safetensors").read_bytes()
        missing = subprocess.run([sys.executable, "-c", script, "someone/pinned@v9"], env=hub_env(tmp_path, hub, None),
                                 capture_output=True, text=True, timeout=120)
        assert missing.returncode != 0 and "someone/pinned@v9 from the Hub (the repo has no such revision)" \
            in missing.stderr
    assert weights["someone/pinned@v1"] == (tiny_adapters["dialogsum"] / "adapter_model.safetensors").read_bytes()
    assert weights["someone/pinned"] == (other / "adapter_model.safetensors").read_bytes()


def test_rejected_token_exits_2_without_echoing_it(adapter_folder, tmp_path):
    wrong = "hf_" + "WrongButWellFormed" * 2
    with FakeHub(tokens=[TOKEN]) as hub:
        result = run_cli(["push", "--adapter", str(adapter_folder), "--repo-id", "someone/x"], tmp_path, hub, wrong)
        assert hub.repos == {}
    assert result.returncode == 2
    assert "the Hub rejected the token (HTTP 401)" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_missing_token_exits_2_with_a_clear_message(adapter_folder, tmp_path):
    with FakeHub(tokens=[TOKEN]) as hub:
        result = run_cli(["push", "--adapter", str(adapter_folder), "--repo-id", "someone/x"], tmp_path, hub, None)
        assert hub.requests == []
    assert result.returncode == 2
    assert "no Hugging Face token found" in result.stderr and "HF_TOKEN" in result.stderr


# ------------------------------------------------------------------ Space

def make_space_root(root: Path) -> Path:
    """A checkout to deploy: the real package and app, plus junk that must stay behind."""
    root.mkdir()
    for name in ("app.py", "requirements.txt"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "phisum", root / "phisum", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "README.md").write_text(SPACE_README)
    (root / "phisum" / "__pycache__").mkdir()
    (root / "phisum" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"bytecode")
    (root / "assets" / "samples").mkdir(parents=True)
    (root / "assets" / "samples" / "dialogues.jsonl").write_text('{"dialogue": "#Person1#: Hi."}\n')
    (root / "assets" / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (root / "outputs").mkdir()
    (root / "outputs" / "optimizer.pt").write_bytes(b"pickle")
    (root / "notes.md").write_text("not part of the Space")
    return root


def test_space_dry_run_holds_app_package_assets_and_readme(tmp_path, capsys):
    root = make_space_root(tmp_path / "checkout")
    out = deploy_space("someone/phisum", root=root, dry_run_dir=tmp_path / "out", hardware="t4-small",
                       variables=space_variables("someone/dialogsum@v1", "someone/oasst", "phi2"))
    files = staged_files(out)
    assert {"app.py", "requirements.txt", "README.md", "phisum/__init__.py", "phisum/cli.py", "phisum/ui/__init__.py",
            "assets/samples/dialogues.jsonl"} <= files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or f.startswith("outputs/")]
    assert "assets/.env" not in files and "notes.md" not in files
    printed = capsys.readouterr().out
    assert "would set Space variable PHISUM_ADAPTER_DIALOGSUM=someone/dialogsum@v1" in printed
    assert "would request hardware t4-small" in printed


def test_space_readme_front_matter_is_checked(tmp_path):
    readme = tmp_path / "README.md"
    if (ROOT / "README.md").exists():  # the project's own README must pass
        assert check_space_readme(ROOT / "README.md")["sdk"] == "gradio"
    for text, message in ((SPACE_README.replace("sdk: gradio", "sdk: streamlit"), "expected 'gradio'"),
                          (SPACE_README.replace("app_file: app.py", "app_file: main.py"), "expected 'app.py'"),
                          ("# no front matter\n", "no front matter"),
                          ("---\ntitle: [unclosed\n---\n", "does not parse")):
        readme.write_text(text)
        with pytest.raises(PublishError, match=message.replace("(", r"\(")):
            check_space_readme(readme)


def test_space_variables_are_hub_ids_the_profiles_read(tmp_path):
    from phisum.config import from_env
    from phisum.profiles import PROFILES

    variables = space_variables("someone/dialogsum@v2", "someone/oasst", None)
    sources = PROFILES["embedded"].adapter_sources(from_env(variables).adapters)
    assert (sources["dialogsum"], sources["oasst"]) == ("someone/dialogsum@v2", "someone/oasst")
    with pytest.raises(PublishError, match="Hub repo id"):
        space_variables(str(tmp_path), None, None)
    with pytest.raises(PublishError, match="Hub repo id"):
        space_variables("not a repo", None, None)


def test_deploy_space_to_fake_hub(tmp_path):
    root = make_space_root(tmp_path / "checkout")
    with FakeHub(tokens=[TOKEN]) as hub:
        result = run_cli(["deploy-space", "--repo-id", "someone/phisum", "--root", str(root), "--hardware",
                          "t4-small", "--dialogsum-adapter", "someone/dialogsum@v1", "--oasst-adapter",
                          "someone/oasst"], tmp_path, hub)
        assert result.returncode == 0, result.stderr
        space = hub.repos["someone/phisum"]
        assert space["type"] == "space" and space["sdk"] == "gradio" and space["hardware"] == "t4-small"
        assert {k: v["value"] for k, v in space["variables"].items()} == {
            "PHISUM_ADAPTER_DIALOGSUM": "someone/dialogsum@v1", "PHISUM_ADAPTER_OASST": "someone/oasst"}
        files = hub.files("someone/phisum")
        assert files["README.md"] == SPACE_README.encode()
        assert {"app.py", "phisum/backends/hf.py", "assets/samples/dialogues.jsonl"} <= set(files)
        assert not [f for f in files if "__pycache__" in f or f.startswith("outputs/") or f.endswith(".env")]
        assert_token_never_sent(hub)
    assert TOKEN not in result.stdout + result.stderr
