"""Evaluation throughput: batched base+adapter generation vs a one-at-a-time loop.

The published notebooks summarise each test dialogue alone, first with the base
model, then with the adapter. The evaluator sorts items by length and runs base
and adapter rows of the same dialogues in one generate call (peft adapter_names).
Both variants run here side by side in one process on the same DialogSum test
items, alternating group by group (one batch's worth of items each); the script prints summaries per minute, the ratio, and how many outputs
are identical (greedy decoding should give the same text either way).

Usage:
  python benchmarks/eval_throughput.py                       # embedded, 32 items, bf16
  python benchmarks/eval_throughput.py --dtype fp32 --n 16   # check output identity in fp32
  python benchmarks/eval_throughput.py --adapter PATH        # another adapter folder
Measured (2 shared, oversubscribed cores, --threads 1, stand-in adapter):
  bf16, 32 items, 128 new tokens: 4.5 -> 24.5 summaries/min, 5.41x; identical outputs: base 26/32, adapter 23/32
  fp32, 16 items, 64 new tokens:  7.0 -> 20.5 summaries/min, 2.90x; identical outputs: 16/16 and 16/16
  (bf16 rounds differently for different batch shapes, so near-tie tokens flip; fp32 matches exactly.)
If assets/adapters/embedded/dialogsum is absent, a stand-in LoRA adapter (random B)
is built in a temporary folder and the script says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_standin_adapter(path: Path, seed: int = 0) -> Path:
    """A real LoRA adapter on the embedded base whose B is random, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phisum.models import load_base
    from phisum.profiles import PROFILES

    profile = PROFILES["embedded"]
    model, _ = load_base(profile, dtype="fp32", progress=False)
    model.name_or_path = profile.base_model  # what peft records as base_model_name_or_path
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(profile.lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    model.save_pretrained(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="DialogSum test items (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="generate rows per batched call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--adapter", default=str(ROOT / "assets/adapters/embedded/dialogsum"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); 1 is far steadier on an oversubscribed CPU")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/dialogsum"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; peft would otherwise probe the Hub
    import torch
    from tqdm.auto import tqdm

    from phisum.data import load_dialogsum
    from phisum.engine import Engine
    from phisum.evaluation import generate_outputs
    from phisum.generation import BASE, GenerationSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, report = load_dialogsum(args.data, "test")
    dialogues = [r["dialogue"] for r in rows[:args.n]]
    adapter = Path(args.adapter)
    tmp = None
    if not (adapter / "adapter_model.safetensors").exists():
        tmp = tempfile.TemporaryDirectory()
        print(f"{adapter} not found: using a stand-in LoRA adapter (random B, r=8) in {tmp.name}")
        adapter = build_standin_adapter(Path(tmp.name) / "dialogsum")
    engine = Engine.load("embedded", adapters={"dialogsum": str(adapter)}, dtype=args.dtype)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    dialogues.sort(key=engine.count_tokens)  # as the evaluator does before batching: less padding
    systems = [BASE, "dialogsum"]
    engine.summarize(dialogues[:1], BASE, GenerationSettings(max_new_tokens=4))  # warm-up, not timed
    print(f"{engine.profile.base_model} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{len(dialogues)} items x {len(systems)} systems, "
          f"max_new_tokens={args.max_new_tokens}, data {report.source}")

    # The CPU is shared: alternate the two variants group by group so load changes hit both alike.
    step = max(1, args.batch_size // 2)
    batched, single = {s: [] for s in systems}, {s: [] for s in systems}
    t_batched = t_single = 0.0
    bar = tqdm(total=4 * len(dialogues), desc="summaries (both variants)", unit="summary")
    for start in range(0, len(dialogues), step):
        group = dialogues[start:start + step]
        t0 = time.perf_counter()
        outs = generate_outputs(engine, group, systems, settings, batch_size=args.batch_size)
        t_batched += time.perf_counter() - t0
        bar.update(2 * len(group))
        t0 = time.perf_counter()
        for system in systems:  # what the notebooks do: base over the items, then the adapter
            for d in group:
                single[system].append(engine.summarize([d], system, settings, batch_size=1)[0])
                bar.update()
        t_single += time.perf_counter() - t0
        bar.write(f"items {start}-{start + len(group) - 1}: one at a time {t_single:.0f} s, batched {t_batched:.0f} s "
                  f"so far ({t_single / t_batched:.2f}x)")
        for s in systems:
            batched[s].extend(outs[s])
    bar.close()

    total = 2 * len(dialogues)
    print(f"one at a time: {t_single:7.1f} s  {60 * total / t_single:6.1f} summaries/min")
    print(f"batched ({args.batch_size} rows): {t_batched:7.1f} s  {60 * total / t_batched:6.1f} summaries/min")
    print(f"speed-up: {t_single / t_batched:.2f}x")
    for s in systems:
        same = sum(a.text == b.text for a, b in zip(batched[s], single[s]))
        cut = sum(g.finish_reason == "length" for g in single[s])
        tokens = sum(g.new_tokens for g in single[s])
        print(f"{s}: {same} of {len(dialogues)} outputs identical; {cut} cut at max_new_tokens; "
              f"{tokens} new tokens one at a time")
        for i, (a, b) in enumerate(zip(batched[s], single[s])):
            if a.text != b.text:
                k = next((j for j, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
                print(f"  item {i}: differ from char {k} of {len(b.text)}: batched {a.text[k:k + 40]!r} "
                      f"vs single {b.text[k:k + 40]!r}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
