"""`python -m phisum <command>`: one entry point for inference, training, evaluation and publishing.

  summarize  FILE|-            summarise a text (base, an adapter, or two systems side by side)
  chat                         streaming terminal chat with the oasst adapter
  info                         profile, backend, adapters found, and why
  train      --config X.yaml   fine-tune from a recipe (any key overridable: --max_steps 10)
  evaluate   --task dialogsum  before/after report (ROUGE, MiniLM cosine, paired bootstrap)
  export-gguf --adapter DIR    adapter as a llama.cpp GGUF LoRA (--out FILE.gguf)
  push       --adapter DIR     adapter + model card to the Hub
  deploy-space                 upload this Space

Global options, before or after the command: --profile {auto,phi2,embedded,tiny},
--backend {auto,transformers,llamacpp,openai}, --base-url URL, --adapter-source NAME=PATH|REPO[@REV]
(repeatable), --bits {4,8}, --threads N. Environment: see phisum/config.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

# Commands whose arguments are parsed by their own module (trl's TrlParser etc.).
DELEGATED = {
    "train": "phisum.training",
    "evaluate": "phisum.evaluation_cli",
    "push": "phisum.hub",
    "deploy-space": "phisum.space",
    "export-gguf": "phisum.gguf_export",
}
MAX_INPUT_BYTES = 4 << 20  # far above any context the profiles allow; stops /dev/zero and endless pipes


def build_parser() -> argparse.ArgumentParser:
    from phisum.config import add_backend_options
    from phisum.tasks import TASKS, summarization_tasks

    parser = argparse.ArgumentParser(prog="python -m phisum", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backend_options(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summarize", help="summarise a text file (or - for stdin)")
    s.add_argument("file", help="text file with the dialogue or article, or - to read stdin")
    s.add_argument("--task", default="dialogsum", choices=summarization_tasks())
    s.add_argument("--adapter", default=None,
                   help="an adapter name, 'base', 'both' (base and the task's adapter) or A,B (two systems); "
                        "default: the task's adapter")
    _generation_args(s)
    s.add_argument("--json", action="store_true", help="print the result as JSON")

    c = sub.add_parser("chat", help="streaming chat in the terminal")
    c.add_argument("--adapter", default=TASKS["oasst"].adapter, help="adapter name or 'base'")
    _generation_args(c, max_new=256)

    sub.add_parser("info", help="print the profile, backend, adapters and why they were chosen")
    for command in ("summarize", "chat", "info"):
        add_backend_options(sub.choices[command], suppress=True)
    for name in DELEGATED:
        sub.add_parser(name, add_help=False, help=f"see python -m phisum {name} --help")
    return parser


def _generation_args(p, max_new: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def _settings(args, context_length: int):
    from phisum.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed).validate(context_length)


def read_input(name: str, limit: int = MAX_INPUT_BYTES) -> str:
    """A file or stdin as UTF-8 text, at most `limit` bytes; InputError (one line) otherwise."""
    from phisum.generation import InputError

    try:
        if name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(name, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > limit:
        raise InputError(f"{'stdin' if name == '-' else name} is over {limit >> 20} MB; "
                         "a summary input is a dialogue or an article")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{'stdin' if name == '-' else name} is not UTF-8 text "
                         f"(invalid byte at offset {exc.start})") from None


def cmd_summarize(args) -> int:
    from phisum import inference
    from phisum.config import open_backend
    from phisum.generation import BASE, validate_text
    from phisum.tasks import get_task

    task = get_task(args.task)
    text = read_input(args.file)  # before loading the model: bad input fails fast
    validate_text(text, task.input_word)  # empty, NUL bytes, binary: also before the model loads
    choice = args.adapter or task.adapter
    pair = (BASE, task.adapter) if choice == "both" else tuple(choice.split(",")) if "," in choice else None
    if pair is not None and len(pair) != 2:
        raise ValueError(f"--adapter takes one system, 'both' or A,B; got {choice!r}")
    backend = open_backend(args, progress=not args.json)
    settings = _settings(args, backend.context_length)
    if pair:
        results = list(inference.compare(backend, [text], pair, settings, task)[0])
    else:
        results = inference.summarize(backend, [text], choice, settings, task)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    for r in results:
        for notice in r.notices[:1]:
            print(f"[phisum] {notice}", file=sys.stderr)
        header = f"== {r.system} ({r.new_tokens} tokens, {r.seconds:.1f} s, stop: {r.finish_reason})"
        # One result: stdout is just the summary (pipe-friendly); two: label each.
        print(header, file=sys.stderr if len(results) == 1 else sys.stdout)
        print(r.display)
    return 0


def cmd_chat(args) -> int:
    from phisum import inference
    from phisum.config import open_backend
    from phisum.generation import InputError

    backend = open_backend(args)
    settings = _settings(args, backend.context_length)
    backend.require(args.adapter)
    print(f"chatting with {backend.profile.base_model} + {args.adapter} ({backend.name}); empty line or "
          "Ctrl-D quits, Ctrl-C stops a reply", file=sys.stderr)
    history = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line})
        reply, shown = "", 0
        print("bot> ", end="", flush=True)
        stream = inference.stream_chat(backend, history, args.adapter, settings)
        try:
            for reply in stream:
                print(reply[shown:], end="", flush=True)
                shown = len(reply)
        except KeyboardInterrupt:
            stream.close()  # cancels generation and releases the model
            print(" [stopped]", end="")
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_info(args) -> int:
    from phisum.config import open_backend

    backend = open_backend(args)
    print(json.dumps(backend.describe(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from phisum.startup import quiet_library_notices

    quiet_library_notices()
    command_line, argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    for i, tok in enumerate(argv):
        if tok in DELEGATED:
            # Global options given before the command (--profile tiny train ...) are passed on,
            # not dropped; the command's own parser rejects any it does not know.
            module, rest = importlib.import_module(DELEGATED[tok]), argv[i + 1:] + argv[:i]
            # Process-wide setup (the allocator) only for a real command line, never for a caller
            # in the same process (tests, notebooks), whose process it would replace.
            if command_line and hasattr(module, "prepare_process"):
                error = module.prepare_process(rest)
                if error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
            return module.main(rest)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[%(name)s] %(message)s")
    from phisum.adapters import AdapterError
    from phisum.backends import BackendError
    from phisum.generation import InputError

    try:
        return {"summarize": cmd_summarize, "chat": cmd_chat, "info": cmd_info}[args.command](args)
    except (InputError, AdapterError, BackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
