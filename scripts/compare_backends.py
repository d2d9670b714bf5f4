"""Parity of two backends: their evaluation reports side by side, and chat replies from each.

Reads two report folders written by `python -m phisum evaluate` on the same items (one per
backend), prints ROUGE for each system under each backend with the difference, and asks each
backend for the oasst adapter's greedy replies to the same prompts (the chat tab's settings).
Writes OUT/report.md and OUT/parity.json.

Usage:
  python -m phisum evaluate --backend transformers ... --out /tmp/parity-transformers
  python -m phisum evaluate --backend llamacpp ... --out /tmp/parity-llamacpp
  python scripts/compare_backends.py --reports /tmp/parity-transformers /tmp/parity-llamacpp \\
      --out assets/reports/backend-parity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Written for this comparison (no dataset text in the repository); the first three are the chat tab's.
PROMPTS = ["What are three tips for staying focused while studying?",
           "Explain what a LoRA adapter is in two sentences.",
           "Write a short, friendly reminder to water the plants.",
           "What should I pack for a weekend hiking trip?",
           "How do I politely decline a meeting invitation?"]
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def chat_replies(backend_name: str, profile: str, max_new: int) -> list[dict]:
    from phisum import inference
    from phisum.backends import load_backend
    from phisum.generation import GenerationSettings
    from phisum.ui.chat_tab import CHAT_REPETITION_PENALTY

    backend = load_backend(profile, backend_name, progress=False)
    settings = GenerationSettings(max_new_tokens=max_new, repetition_penalty=CHAT_REPETITION_PENALTY)
    replies = []
    for prompt in PROMPTS:
        text = ""
        for text in inference.stream_chat(backend, [{"role": "user", "content": prompt}], "oasst", settings):
            pass
        replies.append({"prompt": prompt, "reply": text})
    backend.close()
    return replies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", nargs=2, required=True, metavar=("A", "B"), help="two evaluate report folders")
    parser.add_argument("--profile", default="embedded")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from phisum.startup import quiet_library_notices

    quiet_library_notices()

    metrics = [json.loads((Path(r) / "metrics.json").read_text()) for r in args.reports]
    names = [m["model"].get("backend", "?") for m in metrics]
    if metrics[0]["systems"] != metrics[1]["systems"] or metrics[0]["items"] != metrics[1]["items"]:
        print("error: the two reports score different systems or items", file=sys.stderr)
        return 2
    lines = [f"# Backend parity: {names[0]} vs {names[1]}", "",
             f"{metrics[0]['items']} items of {metrics[0]['data'].get('summary', '?')}; greedy, "
             f"max_new_tokens {metrics[0]['config']['generation']['max_new_tokens']}, the same prompts. "
             "ROUGE F1, max over references.", "",
             "| system | metric | " + " | ".join(names) + " | difference |", "|---|---|---:|---:|---:|"]
    table = {}
    for system in metrics[0]["systems"]:
        for m in METRICS:
            a, b = (x["scores"]["max_over_references"][system][m] for x in metrics)
            table[f"{system}/{m}"] = {names[0]: a, names[1]: b, "difference": b - a}
            lines.append(f"| {system} | {m} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    worst = max(abs(v["difference"]) for v in table.values())
    lines += ["", f"Largest difference: {worst:.4f} (goal: within 0.01).", "",
              "Throughput of each run: " + "; ".join(
                  f"{n} {x['throughput']['summaries_per_minute']:.1f} summaries/min" for n, x in zip(names, metrics)),
              "", "## Chat: the oasst adapter's replies (greedy, repetition penalty as in the chat tab)", ""]
    chats = {n: chat_replies(n, args.profile, args.max_new_tokens) for n in names}
    for i, prompt in enumerate(PROMPTS):
        lines += [f"### {prompt}", ""]
        for n in names:
            reply = chats[n][i]["reply"] or "(empty reply)"
            lines += [f"**{n}:**", "", "\n".join("> " + line for line in reply.splitlines()) or "> (empty)", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / "parity.json").write_text(json.dumps({"backends": names, "rouge": table, "largest_difference": worst,
                                                 "chat": chats}, indent=2, ensure_ascii=False) + "\n")
    print("\n".join(lines[:len(lines)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
