"""`python -m phisum <command>`: one entry point for inference, training, evaluation and publishing.

  summarize  FILE|-            summarise a dialogue (base, an adapter, or both side by side)
  chat                         streaming terminal chat with the oasst adapter
  info                         profile, device, dtype and adapters found
  train      --config X.yaml   fine-tune from a recipe (any key overridable: --max_steps 10)
  evaluate   --task dialogsum  before/after ROUGE report
  push       --adapter DIR     adapter + model card to the Hub
  deploy-space                 upload this Space

Global options go before the command: --profile {auto,phi2,embedded,tiny}
(or PHISUM_PROFILE), --adapter NAME=PATH|REPO[@REV] (repeatable), --bits {4,8}.
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phisum", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="auto (default), phi2, embedded or tiny")
    parser.add_argument("--adapter-source", action="append", default=[], metavar="NAME=SOURCE",
                        help="load adapter NAME from a folder or Hub repo id[@revision]")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None, help="load the base quantized")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summarize", help="summarise a dialogue file (or - for stdin)")
    s.add_argument("file", help="text file with the dialogue, or - to read stdin")
    s.add_argument("--adapter", default="dialogsum", help="adapter name, 'base', or 'both' (default dialogsum)")
    s.add_argument("--task", default="dialogsum", choices=("dialogsum", "xsum"))
    _generation_args(s)
    s.add_argument("--json", action="store_true", help="print the result as JSON")

    c = sub.add_parser("chat", help="streaming chat in the terminal")
    c.add_argument("--adapter", default="oasst", help="adapter name or 'base'")
    _generation_args(c, max_new=256)

    sub.add_parser("info", help="print the profile, device, dtype and adapters")
    for name in DELEGATED:
        sub.add_parser(name, add_help=False, help=f"see python -m phisum {name} --help")
    return parser


def _generation_args(p, max_new: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def _settings(args):
    from phisum.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _engine(args):
    from phisum.engine import Engine
    from phisum.profiles import resolve_profile

    profile, reason = resolve_profile(args.profile)
    print(f"[phisum] {reason}", file=sys.stderr)
    adapters = profile.adapter_sources()
    for spec in args.adapter_source:
        name, _, source = spec.partition("=")
        if not source:
            raise SystemExit(f"--adapter-source expects NAME=SOURCE, got {spec!r}")
        adapters[name] = source
    engine = Engine.load(profile, adapters=adapters, bits=args.bits)
    for name, why in engine.missing.items():
        print(f"[phisum] adapter {name!r} not loaded: {why}", file=sys.stderr)
    return engine


def cmd_summarize(args) -> int:
    from phisum.generation import InputError

    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except UnicodeDecodeError:
        print(f"error: {args.file} is not UTF-8 text", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    engine = _engine(args)
    settings = _settings(args)
    try:
        if args.adapter == "both":
            base, tuned = engine.compare([text], "dialogsum" if args.task == "dialogsum" else "xsum",
                                         settings, task=args.task)[0]
            results = [base, tuned]
        else:
            results = engine.summarize([text], args.adapter, settings, task=args.task)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    from phisum.generation import InputError

    engine = _engine(args)
    settings = _settings(args)
    print(f"chatting with {engine.profile.base_model} + {args.adapter}; empty line or Ctrl-D quits, "
          "Ctrl-C stops a reply", file=sys.stderr)
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
        stream = engine.stream_chat(history, args.adapter, settings)
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
    engine = _engine(args)
    print(json.dumps(engine.info(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated commands parse their own flags; split global options off first.
    for i, tok in enumerate(argv):
        if tok in DELEGATED:
            # Global options given before the command (--profile tiny train ...) are passed on,
            # not dropped; the command's own parser rejects any it does not know.
            return importlib.import_module(DELEGATED[tok]).main(argv[i + 1:] + argv[:i])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[%(name)s] %(message)s")
    return {"summarize": cmd_summarize, "chat": cmd_chat, "info": cmd_info}[args.command](args)
