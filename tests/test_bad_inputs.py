"""The bad-input matrix (reliability issue): one row per bad input, run on every surface it applies to.

Surfaces: the CLI (`phisum.cli.main`, in process; a few rows also as real `python -m phisum`
processes), `evaluate` and `train` (through the same dispatcher), and the app's API (the real
Gradio app on the tiny profile, served on loopback, driven by gradio_client or, where the client
cannot encode the value (NaN, a lone surrogate), by the same HTTP calls it makes).

Every row ends in one of:
- a refusal: CLI/trainer exit code 2 and exactly one `error: ...` line on stderr (the last one)
  naming the problem, no traceback; app: AppError whose message names the problem;
- a sensible result (a truncation notice, control tokens kept as text, a broken adapter named).
Nothing the user made changes (the folder of user files is byte-identical after every CLI and
trainer row), and the app still answers a good /summarize after every app row.
`test_matrix_totals` prints rows x surfaces and how many passed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from phisum import cli
from tests.app_server import serve
from tests.conftest import ROOT, make_tiny_adapter

NAN = float("nan")
DIALOGUE = "#Person1#: Is the library open on Sunday?\n#Person2#: Yes, from ten to four."
GOOD = (8, False, 0.7, 0.9)  # max new tokens, sample, temperature, top-p of the check after each app row
# Control-token look-alikes typed in a dialogue; the tiny tokenizer's EOS is <|endoftext|>.
EOS_TAIL = " and this tail after them must reach the model."
EOS_DIALOGUE = ("#Person1#: I typed <|endoftext|> and <eos> and </s> into the chat.\n"
                "#Person2#: <start_of_turn>user They stay text" + EOS_TAIL)
KB100 = "\n".join(f"#Person{i % 2 + 1}#: sentence number {i} in a very long talk." for i in range(2500))
MB2 = KB100 * 21
assert len(KB100.encode()) > 100_000 and len(MB2.encode()) > 2_000_000

RESULTS: dict[str, bool] = {}  # case id -> passed (filled as the cases run; printed at the end)


# ------------------------------------------------------------------ the table

@dataclass
class Case:
    row: str  # the bad input, as the reliability issue names it
    surface: str  # cli | cli process | evaluate | train | train process | api | app start
    argv: tuple = ()  # CLI surfaces: arguments; "{name}" is replaced by the user file `name`
    expect: str | None = None  # regex the one error line (or AppError) must match; None: must succeed
    check: str | None = None  # for rows that succeed: name of the check in CHECKS
    stdin: bytes | None = None
    env: dict = field(default_factory=dict)  # environment for the call ("{name}" replaced too)
    endpoint: str = ""  # api: /summarize, /chat, /live_rouge, or "upload"
    values: dict = field(default_factory=dict)  # api: inputs that differ from the good call
    raw: bool = False  # api: send through plain HTTP (gradio_client cannot encode NaN or lone surrogates)
    tag: str = ""  # tells apart two cases of one row on one surface

    @property
    def id(self) -> str:
        detail = self.endpoint or (self.argv[2] if self.surface == "cli" else "")
        return f"{self.row} [{' '.join(filter(None, (self.surface, detail, self.tag)))}]"


def cli_case(row, *argv, expect=None, **kw):
    return Case(row, "cli", ("--profile", "tiny", *argv), expect, **kw)


def summarize_case(row, *extra, file="{dialogue}", expect=None, **kw):
    return cli_case(row, "summarize", file, "--adapter", "base", "--max-new-tokens", "8", *extra,
                    expect=expect, **kw)


def eval_case(row, *extra, expect=None, out="{scratch}/out", data="{data}", **kw):
    argv = ["evaluate", "--profile", "tiny", "--task", "dialogsum", "--data", data, "--split", "test",
            "--out", out, "--no-progress", "--no-semantic", "--max-new-tokens", "8", "--adapters", "base"]
    return Case(row, "evaluate", (*argv, *extra), expect, **kw)


def train_case(row, *extra, recipe="{recipe}", expect=None, **kw):
    return Case(row, "train", ("train", "--config", recipe, *extra), expect, **kw)


def api_case(row, endpoint, expect=None, check=None, tag="", **values):
    raw = any(isinstance(v, float) and math.isnan(v) for v in values.values())  # the client refuses NaN
    return Case(row, "api", (), expect, check=check, endpoint=endpoint, values=values, raw=raw, tag=tag)


SEED_70 = str(2**70)
# What loading says about each broken adapter (name as PHISUM_ADAPTER_<NAME> gives it -> the reason).
BROKEN = {"dialogsum": "truncated cannot be loaded on phisum/tiny-phi \\(SafetensorError",
          "oasst": "pickled has no adapter_model.safetensors \\(found adapter_model.bin: pickled weights are not loaded",
          "other-base": "built for base model 'microsoft/phi-2', but the tiny profile runs 'phisum/tiny-phi'"}
SETTING_VALUES = [("NaN", NAN), ("null", None), ("a string", "abc"), ("negative", -5), ("huge", 10**9)]

CASES: list[Case] = [
    # --- text that is not a usable dialogue
    summarize_case("empty text", file="{empty}", expect="dialogue is empty"),
    summarize_case("whitespace only", file="{blank}", expect="dialogue is empty"),
    summarize_case("NUL bytes", file="{nul}", expect="NUL bytes"),
    summarize_case("binary file", file="{binary}", expect="not UTF-8"),
    summarize_case("control characters", file="{control}", expect="binary data .*control characters"),
    summarize_case("invalid UTF-8 file", file="{latin1}", expect="not UTF-8 text .*offset 14"),
    summarize_case("invalid UTF-8 stdin", file="-", stdin=b"#Person1#: caf\xe9\n", expect="stdin is not UTF-8"),
    summarize_case("empty stdin", file="-", stdin=b"", expect="dialogue is empty"),
    summarize_case("missing file", file="{scratch}/nowhere.txt", expect="cannot read .*nowhere.txt"),
    summarize_case("a folder as the file", file="{data}", expect="cannot read .*Is a directory"),
    summarize_case(">4 MB file", file="{over4mb}", expect="over4mb.txt is over 4 MB"),
    summarize_case("/dev/zero", file="/dev/zero", expect="/dev/zero is over 4 MB"),
    summarize_case("100 KB dialogue", "--json", file="{kb100}", check="cli_truncated"),
    summarize_case("2 MB dialogue", "--json", file="{mb2}", check="cli_truncated"),
    summarize_case("<eos>/<|endoftext|> typed in a dialogue", "--json", file="{eos}", check="cli_eos_is_text"),
    # --- generation settings
    summarize_case("max new tokens 0", "--max-new-tokens", "0", expect="max new tokens must be between 1 and"),
    summarize_case("max new tokens negative", "--max-new-tokens", "-5", expect="max new tokens must be between"),
    summarize_case("max new tokens huge", "--max-new-tokens", "100000", expect="max new tokens must be between"),
    summarize_case("max new tokens a string", "--max-new-tokens", "abc", expect="--max-new-tokens: invalid int"),
    summarize_case("max new tokens fractional", "--max-new-tokens", "1.5", expect="--max-new-tokens: invalid int"),
    summarize_case("max new tokens NaN", "--max-new-tokens", "nan", expect="--max-new-tokens: invalid int"),
    summarize_case("temperature NaN", "--sample", "--temperature", "nan", expect="temperature must be in"),
    summarize_case("temperature negative", "--sample", "--temperature", "-1", expect="temperature must be in"),
    summarize_case("temperature huge", "--sample", "--temperature", "1e9", expect="temperature must be in"),
    summarize_case("temperature a string", "--sample", "--temperature", "abc", expect="--temperature: invalid float"),
    summarize_case("top-p NaN", "--sample", "--top-p", "nan", expect="top-p must be in"),
    summarize_case("top-p negative", "--sample", "--top-p", "-0.5", expect="top-p must be in"),
    summarize_case("top-p huge", "--sample", "--top-p", "5", expect="top-p must be in"),
    summarize_case("top-p a string", "--sample", "--top-p", "abc", expect="--top-p: invalid float"),
    summarize_case("seed 2**70", "--seed", SEED_70, expect="seed must be a whole number from 0 to 2\\*\\*32"),
    summarize_case("seed negative", "--seed", "-1", expect="seed must be a whole number from 0"),
    summarize_case("seed fractional", "--seed", "1.5", expect="--seed: invalid int"),
    summarize_case("seed a string", "--seed", "abc", expect="--seed: invalid int"),
    # --- options
    summarize_case("--threads -1", "--threads", "-1", expect="--threads: expected a number from 1 to 4096, got -1"),
    summarize_case("--threads 0", "--threads", "0", expect="--threads: expected a number from 1 to 4096, got 0"),
    summarize_case("--threads abc", "--threads", "abc", expect="--threads: expected a whole number, got 'abc'"),
    summarize_case("unknown profile", "--profile", "llama", expect="unknown profile 'llama'"),
    summarize_case("unknown backend", "--backend", "tgi", expect="unknown backend 'tgi'"),
    summarize_case("unknown task", "--task", "nope", expect="--task: invalid choice: 'nope'"),
    summarize_case("unknown adapter name", "--adapter", "nope", expect="adapter 'nope' is not available"),
    summarize_case("three systems for --adapter", "--adapter", "base,a,b", expect="--adapter takes one system"),
    summarize_case("--adapter-source without =", "--adapter-source", "dialogsum",
                   expect="--adapter-source expects NAME=SOURCE, got 'dialogsum'"),
    # --- broken adapters, given the way a Space gives them (PHISUM_ADAPTER_<NAME>)
    cli_case("truncated adapter_model.safetensors", "info", env={"PHISUM_ADAPTER_DIALOGSUM": "{truncated}"},
             check="cli_info_names_broken", values={"adapter": "dialogsum", "reason": BROKEN["dialogsum"]}),
    summarize_case("truncated adapter_model.safetensors", "--adapter", "dialogsum",
                   env={"PHISUM_ADAPTER_DIALOGSUM": "{truncated}"},
                   expect="adapter 'dialogsum' is not available: .*cannot be loaded"),
    cli_case("pickle-only adapter folder", "info", env={"PHISUM_ADAPTER_OASST": "{pickled}"},
             check="cli_info_names_broken", values={"adapter": "oasst", "reason": BROKEN["oasst"]}),
    summarize_case("pickle-only adapter folder", "--adapter", "oasst", env={"PHISUM_ADAPTER_OASST": "{pickled}"},
                   expect="adapter 'oasst' is not available: .*pickled weights are not loaded"),
    cli_case("adapter of another base", "info", env={"PHISUM_ADAPTER_OTHER_BASE": "{other_base}"},
             check="cli_info_names_broken", values={"adapter": "other-base", "reason": BROKEN["other-base"]}),
    summarize_case("adapter of another base", "--adapter", "other-base",
                   env={"PHISUM_ADAPTER_OTHER_BASE": "{other_base}"},
                   expect="built for base model 'microsoft/phi-2'.*tiny profile runs 'phisum/tiny-phi'"),

    # --- evaluate
    eval_case("--n 0", "--n", "0", expect="--n: expected a number from 1 to 4096, got 0"),
    eval_case("--resamples 0", "--resamples", "0", expect="--resamples: expected a number from 1 to 4096, got 0"),
    eval_case("--batch-size 0", "--batch-size", "0", expect="--batch-size: expected a number from 1 to 4096, got 0"),
    eval_case("max new tokens 0", "--max-new-tokens", "0", expect="--max-new-tokens: expected a number from 1"),
    eval_case("--threads -1", "--threads", "-1", expect="--threads: expected a number from 1 to 4096, got -1"),
    eval_case("--threads 0", "--threads", "0", expect="--threads: expected a number from 1 to 4096, got 0"),
    eval_case("--threads abc", "--threads", "abc", expect="--threads: expected a whole number, got 'abc'"),
    eval_case("--out an existing report folder", out="{report}", expect="already holds files; .*--overwrite"),
    eval_case("--out a file", out="{dialogue}", expect="dialogue.txt is a file; give a folder"),
    eval_case("unknown adapter name", "--adapters", "base,nope", expect="no source for adapter 'nope'"),
    eval_case("--adapter-source without =", "--adapters", "base,dialogsum", "--adapter-source", "dialogsum",
              expect="--adapter-source expects NAME=SOURCE"),
    eval_case("truncated adapter_model.safetensors", "--adapters", "base,dialogsum",
              env={"PHISUM_ADAPTER_DIALOGSUM": "{truncated}"},
              expect="adapter 'dialogsum' could not be loaded: .*cannot be loaded"),
    eval_case("unknown profile", "--profile", "llama", expect="unknown profile 'llama'"),
    eval_case("unknown backend", "--backend", "tgi", expect="unknown backend 'tgi'"),
    eval_case("unknown task", "--task", "nope", expect="--task: invalid choice: 'nope'"),
    eval_case("missing data folder", data="{scratch}/no/such/folder", expect="neither a local file or folder"),
    eval_case("data file with bad JSON", data="{bad_json}", expect="test.jsonl line 2 is not valid JSON"),
    eval_case("data file with wrong fields", data="{wrong_fields}", expect="no row has the field 'dialogue'"),
    eval_case("data file not UTF-8", data="{not_utf8}", expect="test.jsonl is not UTF-8"),
    eval_case("empty data file", data="{empty_data}", expect="test.jsonl has no rows"),

    # --- train
    train_case("malformed recipe YAML", recipe="{bad_yaml}", expect="recipe is not valid YAML \\(line \\d+: expected"),
    train_case("unknown recipe key", recipe="{unknown_key}", expect="\\['--lora_rank', '4'\\]"),
    train_case("unknown key on the command line", "--lora_rank", "4", expect="\\['--lora_rank', '4'\\]"),
    train_case("missing recipe file", recipe="{scratch}/nope.yaml", expect="No such file .*nope.yaml"),
    train_case("--max_steps 0", "--max_steps", "0", expect="max_steps 0 .*trains nothing"),
    train_case("--max_steps abc", "--max_steps", "abc", expect="--max_steps.*invalid int value: 'abc'"),
    train_case("seed 2**70", "--seed", SEED_70, expect="seed must be from 0 to 2\\*\\*32 - 1"),
    train_case("unknown task", "--task", "nope", expect="task must be one of .*'nope'"),
    train_case("unknown profile", "--profile", "llama", expect="profile must be one of .*'llama'"),
    train_case("--resume_from_checkpoint a half-written checkpoint", "--resume_from_checkpoint", "{half_ckpt}",
               expect="not a complete checkpoint \\(optimizer.pt, scheduler.pt, weights"),
    train_case("--resume_from_checkpoint a missing folder", "--resume_from_checkpoint", "{scratch}/checkpoint-9",
               expect="not a complete checkpoint \\(no such folder\\)"),
    train_case("adapter_dir already holds an adapter", "--adapter_dir", "{user_adapter}",
               expect="already holds files; .*--overwrite true"),
    train_case("adapter_dir is a file", "--adapter_dir", "{dialogue}", expect="adapter_dir .*is a file"),
    train_case("missing data folder", "--dataset_source", "{scratch}/no/such/folder",
               expect="neither a local file or folder"),
    train_case("data file with bad JSON", "--dataset_source", "{bad_json}", expect="train.jsonl line 2 is not valid"),
    train_case("data file with wrong fields", "--dataset_source", "{wrong_fields}",
               expect="no row has the field 'dialogue'"),
    train_case("data file not UTF-8", "--dataset_source", "{not_utf8}", expect="train.jsonl is not UTF-8"),
    train_case("empty data file", "--dataset_source", "{empty_data}", expect="train.jsonl has no rows"),

    # --- the app's API
    api_case("empty text", "/summarize", "dialogue is empty", text=""),
    api_case("empty text", "/chat", "message is empty", message=""),
    api_case("whitespace only", "/summarize", "dialogue is empty", text="  \n\t \n"),
    api_case("whitespace only", "/chat", "message is empty", message=" \n "),
    api_case("NUL bytes", "/summarize", "NUL bytes", text="#Person1#: hi\x00 there"),
    api_case("NUL bytes", "/chat", "NUL bytes", message="hi\x00 there"),
    api_case("control characters", "/summarize", "binary data .*control characters", text="\x1b\x07\x08\x0b" * 50),
    api_case("control characters", "/chat", "binary data .*control characters", message="\x1b\x07\x08\x0b" * 50),
    # gradio_client cannot send a lone surrogate (httpx encodes the body as strict UTF-8): raw HTTP
    Case("lone UTF-16 surrogate", "api", (), "invalid Unicode \\(a lone surrogate", endpoint="/summarize",
         values={"text": "#Person1#: hi \ud800"}, raw=True),
    Case("lone UTF-16 surrogate", "api", (), "invalid Unicode \\(a lone surrogate", endpoint="/chat",
         values={"message": "\ud800"}, raw=True),
    api_case("100 KB dialogue", "/summarize", check="api_truncated", text=KB100),
    api_case("2 MB dialogue", "/summarize", check="api_truncated", text=MB2),
    api_case("<eos>/<|endoftext|> typed in a dialogue", "/summarize", check="api_eos_is_text", text=EOS_DIALOGUE),
    *[api_case(f"max new tokens {name}", endpoint, "(?i)max new tokens", max_new=value)
      for endpoint in ("/summarize", "/chat", "/live_rouge") for name, value in SETTING_VALUES + [("fractional", 24.5)]],
    *[api_case(f"temperature {name}", endpoint, "Temperature must be", sample=True, temperature=value)
      for endpoint in ("/summarize", "/chat") for name, value in SETTING_VALUES],
    *[api_case(f"top-p {name}", endpoint, "Top-p must be", sample=True, top_p=value)
      for endpoint in ("/summarize", "/chat") for name, value in SETTING_VALUES],
    *[api_case(f"N {name}", "/live_rouge", "^N( dialogues)? must be", n=value)
      for name, value in SETTING_VALUES + [("fractional", 2.5), ("0", 0)]],
    *[api_case(f"seed {name}", "/live_rouge", "^seed must be", seed=value)
      for name, value in [*SETTING_VALUES[:4], ("2**70", 2**70), ("fractional", 2.5)]],
    api_case("unknown system name", "/summarize", "nope is not in the list of choices", tag="left", left="nope"),
    api_case("unknown system name", "/summarize", "nope is not in the list of choices", tag="right", right="nope"),
    api_case("unknown system name", "/live_rouge", "nope is not in the list of choices", right="nope"),
    api_case("upload over max_file_size", "upload", "File size exceeded maximum allowed size of 1048576 bytes"),
    *[Case(row, "app start", values={"adapter": name, "reason": BROKEN[name]})
      for row, name in [("truncated adapter_model.safetensors", "dialogsum"), ("pickle-only adapter folder", "oasst"),
                        ("adapter of another base", "other-base")]],

    # --- the same refusals from a real process: exit status, stderr, no traceback
    Case("invalid UTF-8 stdin", "cli process", ("--profile", "tiny", "summarize", "-"), "stdin is not UTF-8",
         stdin=b"#Person1#: caf\xe9\n"),
    Case("/dev/zero", "cli process", ("--profile", "tiny", "summarize", "/dev/zero"), "/dev/zero is over 4 MB"),
    Case("empty text", "cli process", ("--profile", "tiny", "summarize", "{empty}"), "dialogue is empty"),
    Case("--threads abc", "cli process", ("--threads", "abc", "info"), "expected a whole number, got 'abc'"),
    Case("malformed recipe YAML", "train process", ("train", "--config", "{bad_yaml}"), "not valid YAML"),
    Case("--max_steps abc", "train process", ("train", "--config", "{recipe}", "--max_steps", "abc"),
         "--max_steps.*invalid int value: 'abc'"),
]


def cases(*surfaces):
    return pytest.mark.parametrize("case", [c for c in CASES if c.surface in surfaces], ids=lambda c: c.id)


# ------------------------------------------------------------------ the user's files

def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_folder(root: Path, name: str, content: bytes) -> Path:
    folder = root / name
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_adapters):
    """Everything a user hands phisum in these rows, in one folder that must stay byte-identical."""
    root = tmp_path_factory.mktemp("user")
    scratch = tmp_path_factory.mktemp("scratch")  # where outputs would go; never holds user files
    paths = {"root": root, "scratch": scratch}

    def text(name, content):
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name.split(".")[0]] = path

    text("dialogue.txt", DIALOGUE)
    text("empty.txt", "")
    text("blank.txt", "  \n\t \n")
    text("nul.txt", "#Person1#: hi\x00 there\n#Person2#: hello")
    text("binary.bin", bytes(range(256)) * 4)
    text("control.txt", "\x1b\x07\x08\x0b" * 50)
    text("latin1.txt", b"#Person1#: caf\xe9 au lait?\n")
    text("over4mb.txt", b"#Person1#: hello there.\n" * 180_000)
    text("kb100.txt", KB100)
    text("mb2.txt", MB2)
    text("eos.txt", EOS_DIALOGUE)
    assert paths["over4mb"].stat().st_size > 4 << 20

    rows = [{"fname": f"r{i}", "dialogue": DIALOGUE, "summary": "The library opens on Sunday."} for i in range(4)]
    paths["data"] = root / "data"
    paths["data"].mkdir()
    for split in ("train", "validation", "test"):
        write_jsonl(paths["data"] / f"{split}.jsonl", rows)
    paths["bad_json"] = data_folder(root, "bad_json", json.dumps(rows[0]).encode() + b"\n{not json\n")
    paths["wrong_fields"] = data_folder(root, "wrong_fields", b'{"text": "hello", "label": 1}\n')
    paths["not_utf8"] = data_folder(root, "not_utf8", '{"dialogue": "caf\u00e9", "summary": "x"}\n'.encode("latin-1"))
    paths["empty_data"] = data_folder(root, "empty_data", b"")

    report = paths["report"] = root / "report"
    report.mkdir()
    (report / "notes.txt").write_text("my notes about last week's run\n")
    user_adapter = paths["user_adapter"] = root / "my-adapter"
    user_adapter.mkdir()
    (user_adapter / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    half = paths["half_ckpt"] = root / "run" / "checkpoint-4"
    half.mkdir(parents=True)
    (half / "trainer_state.json").write_text("{}")  # killed while saving: no weights, no optimizer

    truncated = paths["truncated"] = root / "truncated"
    shutil.copytree(tiny_adapters["dialogsum"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = paths["pickled"] = root / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_adapters["oasst"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    other = paths["other_base"] = make_tiny_adapter(root / "other-base", trained=True, seed=3)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "microsoft/phi-2"
    (other / "adapter_config.json").write_text(json.dumps(config))

    recipe = {"profile": "tiny", "use_peft": True, "lora_r": 8, "lora_alpha": 16,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "dense"], "task": "dialogsum",
              "dataset_source": str(paths["data"]), "output_dir": str(scratch / "run"), "max_length": 256,
              "max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no", "report_to": "none",
              "disable_tqdm": True, "seed": 0}
    import yaml

    paths["recipe"] = root / "recipe.yaml"
    paths["recipe"].write_text(yaml.safe_dump(recipe))
    paths["unknown_key"] = root / "unknown_key.yaml"
    paths["unknown_key"].write_text(yaml.safe_dump({**recipe, "lora_rank": 4}))
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("profile: tiny\nuse_peft: true\nlora_target_modules: [q_proj, k_proj\n")
    return SimpleNamespace(paths={k: str(v) for k, v in paths.items()}, root=root, before=snapshot(root))


def fill(value: str, files) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: files.paths[m.group(1)], value)


# ------------------------------------------------------------------ checks

def assert_one_error_line(code, err: str, expect: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line, the last one, naming the problem."""
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]
    assert re.search(expect, errors[0]), errors[0]
    return errors[0]


def eos_prompt_ids(backend, max_new: int) -> list[int]:
    from phisum.inference import fit_text

    prompt, notices = fit_text(backend, "dialogsum", EOS_DIALOGUE, max_new)
    assert not notices and prompt.rstrip().endswith(EOS_TAIL.strip() + "\nOutput:")  # nothing cut
    ids = backend.tokenizer(prompt).input_ids
    assert backend.tokenizer.eos_token_id not in ids  # typed markers are text, not control tokens
    return ids


def cli_truncated(code, out, err, backend, case):
    assert code == 0, err[-2000:]
    (result,) = json.loads(out)
    assert result["notices"] and result["notices"][0].startswith("Input truncated: it was")
    assert 0 < result["prompt_tokens"] <= backend.context_length - 8 and result["new_tokens"] <= 8


def cli_eos_is_text(code, out, err, backend, case):
    assert code == 0, err[-2000:]
    (result,) = json.loads(out)
    assert result["prompt_tokens"] == len(eos_prompt_ids(backend, 8)) and not result["notices"]


def cli_info_names_broken(code, out, err, backend, case):
    name = case.values["adapter"]
    assert code == 0, err[-2000:]
    info = json.loads(out)
    assert name not in info["adapters"] and re.search(case.values["reason"], info["missing_adapters"][name])
    assert f"adapter {name!r} not loaded" in err  # said on stderr too


def api_truncated(result, backend, case):
    base, base_stats, tuned, _, _, note = result
    assert "Input truncated" in note and base and tuned and "new tokens" in base_stats


def api_eos_is_text(result, backend, case):
    base, base_stats, tuned, _, _, note = result
    assert base and tuned and "truncated" not in note
    assert f"prompt {len(eos_prompt_ids(backend, 8))} tokens" in base_stats


CHECKS = {f.__name__: f for f in (cli_truncated, cli_eos_is_text, cli_info_names_broken, api_truncated,
                                  api_eos_is_text)}


def record(case: Case):
    RESULTS[case.id] = True


# ------------------------------------------------------------------ CLI, evaluate and train, in process

@cases("cli", "evaluate", "train")
def test_command_line(case, files, tiny_backend, capsys, monkeypatch):
    for key in [k for k in os.environ if k.startswith("PHISUM_")]:
        monkeypatch.delenv(key)
    for key, value in case.env.items():
        monkeypatch.setenv(key, fill(value, files))
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin)))
    capsys.readouterr()
    try:
        code = cli.main([fill(a, files) for a in case.argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    if case.expect:
        assert_one_error_line(code, err, case.expect)
    else:
        CHECKS[case.check](code, out, err, tiny_backend, case)
    assert snapshot(files.root) == files.before, "a user's file changed"
    record(case)


# ------------------------------------------------------------------ the same from real processes

def test_command_line_in_real_processes(files):
    """Exit status and stderr as a shell sees them; the processes run side by side."""
    group = [c for c in CASES if c.surface.endswith(" process")]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PHISUM_")}, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "phisum", *[fill(a, files) for a in c.argv]], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in group]
    failures = []
    for case, proc in zip(group, procs):
        _, err = proc.communicate(case.stdin or b"", timeout=300)
        try:
            assert_one_error_line(proc.returncode, err.decode(errors="replace"), case.expect)
            record(case)
        except AssertionError as exc:
            failures.append(f"{case.id}: {exc}")
    assert snapshot(files.root) == files.before, "a user's file changed"
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ the app's API

@pytest.fixture(scope="module")
def app(tiny_backend):
    with serve(tiny_backend) as (url, _):
        yield SimpleNamespace(url=url, client=Client(url, verbose=False))


def api_inputs(endpoint: str, values: dict) -> list:
    defaults = {
        "/summarize": {"text": DIALOGUE, "max_new": 8, "sample": False, "temperature": 0.7, "top_p": 0.9,
                       "left": "base", "right": "dialogsum"},
        "/chat": {"message": "Hello there", "base": False, "max_new": 8, "sample": False, "temperature": 0.7,
                  "top_p": 0.9},
        "/live_rouge": {"n": 2, "seed": 0, "max_new": 16, "left": "base", "right": "dialogsum", "semantic": False},
    }[endpoint]
    assert set(values) <= set(defaults), values
    return list({**defaults, **values}.values())


def raw_predict(url: str, endpoint: str, data: list):
    """What gradio_client does, with the body encoded as a careless client would (json.dumps:
    NaN as a bare literal, a lone surrogate as a \\ud800 escape), which the client itself refuses."""
    body = json.dumps({"data": data})
    name = endpoint.strip("/")
    started = httpx.post(f"{url}gradio_api/call/{name}", content=body, headers={"content-type": "application/json"},
                         timeout=60)
    started.raise_for_status()
    event = ""
    with httpx.stream("GET", f"{url}gradio_api/call/{name}/{started.json()['event_id']}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("error", "complete"):
                payload = json.loads(line.split(":", 1)[1])
                if event == "error":
                    raise AppError((payload or {}).get("error") or "(no message)")
                return payload
    raise AssertionError(f"{endpoint}: the event stream ended without a result")


def good_call_answers(client: Client) -> None:
    base, _, tuned, _, _, _ = client.predict(DIALOGUE, *GOOD, api_name="/summarize")
    assert base and tuned


@cases("api")
def test_app_api(case, app, tiny_backend):
    if case.endpoint == "upload":
        response = httpx.post(f"{app.url}gradio_api/upload",
                              files={"files": ("big.txt", b"x" * (2 << 20), "text/plain")}, timeout=60)
        assert response.status_code == 413 and re.search(case.expect, response.text), response.text
    elif case.expect:
        data = api_inputs(case.endpoint, case.values)
        with pytest.raises(AppError) as caught:
            if case.raw:
                raw_predict(app.url, case.endpoint, data)
            else:
                app.client.predict(*data, api_name=case.endpoint)
        message = str(caught.value)
        assert re.search(case.expect, message), message
        assert "\n" not in message.strip() and "Traceback" not in message
    else:
        result = app.client.predict(*api_inputs(case.endpoint, case.values), api_name=case.endpoint)
        CHECKS[case.check](result, tiny_backend, case)
    good_call_answers(app.client)
    record(case)


@pytest.fixture(scope="module")
def broken_app(files):
    """The app as a Space starts it, with its adapters given through PHISUM_ADAPTER_<NAME>, all broken."""
    import argparse

    from phisum.config import open_backend

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("PHISUM_")]:
            mp.delenv(key)
        mp.setenv("PHISUM_ADAPTER_DIALOGSUM", files.paths["truncated"])
        mp.setenv("PHISUM_ADAPTER_OASST", files.paths["pickled"])
        mp.setenv("PHISUM_ADAPTER_OTHER_BASE", files.paths["other_base"])
        backend = open_backend(argparse.Namespace(profile="tiny"), progress=False)
    with serve(backend) as (url, _):
        config = httpx.get(f"{url}config", timeout=30).json()
        (header,) = [c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == "header"]
        yield SimpleNamespace(url=url, client=Client(url, verbose=False), header=header, backend=backend)


@cases("app start")
def test_app_starts_and_its_header_names_the_broken_adapter(case, broken_app):
    name = case.values["adapter"]
    assert name not in broken_app.backend.adapters
    (line,) = [line for line in broken_app.header.splitlines() if f"Adapter `{name}` is not loaded" in line]
    assert re.search(case.values["reason"], line), line  # the reason, as loading said it
    base, _, tuned, _, _, note = broken_app.client.predict(DIALOGUE, *GOOD, api_name="/summarize")
    assert base and "no fine-tuned adapter" in tuned and "not loaded" in note  # the base still answers
    record(case)


# ------------------------------------------------------------------ totals

def test_matrix_totals(request):
    """Rows x surfaces, and how many passed (the count the README quotes)."""
    rows, surfaces = {c.row for c in CASES}, {c.surface for c in CASES}
    passed = sum(RESULTS.get(c.id, False) for c in CASES)
    line = f"bad-input matrix: {len(rows)} rows x {len(surfaces)} surfaces = {len(CASES)} cases, {passed} passed"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s
            reporter.write_line("")
            reporter.write_line(line)
    assert len({c.id for c in CASES}) == len(CASES), "two cases share an id"
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and getattr(item, "callspec", None) is not None
                and "case" in item.callspec.params}
    if any(item.name == "test_command_line_in_real_processes" for item in request.session.items):
        selected |= {c.id for c in CASES if c.surface.endswith(" process")}
    if selected == {c.id for c in CASES}:  # the whole matrix ran: every case must have passed
        assert passed == len(CASES), line
