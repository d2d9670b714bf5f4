"""Memory: the base plus its LoRA adapters against the base alone (resident set size).

Usage:
  python benchmarks/memory.py                     # embedded model, transformers backend, ~1 min
  python benchmarks/memory.py --iterations 3
  python benchmarks/memory.py --backend llamacpp  # the same comparison on llama.cpp (in-process server)
  python benchmarks/memory.py --profile tiny --quick

Each variant runs in a fresh python: load_backend(profile, --backend, adapters=...),
then one backend.generate(prompts, systems, settings) of one row per system (all
"base" for the base variant; base and every adapter in one mixed batch for the
adapter variant), then RSS is read from /proc/self/status. Both backends run in
the measuring process (llama.cpp's server through xllamacpp), so its RSS is the
whole cost. The variants run interleaved. Adapters: the profile's own that are
there (assets/adapters/<profile>/<name>) when at least two are, else two stand-in
LoRA adapters (r=16 on the profile's target modules, random B) made with peft in a
temporary folder, which the output says. For llamacpp the adapters are exported to
GGUF LoRA files (phisum.gguf_export's cache) before the measured processes start.
Goal: base + adapters <= 1.1x the base alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _util and phisum, from any working directory
from _util import RESULT_TAG, load_line, make_standin_adapters, median, print_table, run_child, verdict

GOAL = 1.1
BACKENDS = ("transformers", "llamacpp")  # in-process backends: the child's RSS is what serving costs
CHILD = """
import json, resource
from phisum.backends import load_backend
from phisum.generation import GenerationSettings
from phisum.tasks import TASKS
backend = load_backend({profile!r}, {backend!r}, adapters={adapters!r}, progress=False)
assert not backend.missing, backend.missing
prompt = TASKS["dialogsum"].prompt("#Person1#: Is the report ready?\\n#Person2#: Yes, I sent it this morning.")
systems = {systems!r}
backend.generate([prompt] * len(systems), systems, GenerationSettings(max_new_tokens=16))
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print({tag!r} + json.dumps({{"rss": rss, "peak": peak}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="embedded (default), phi2 or tiny")
    parser.add_argument("--backend", default="transformers", choices=BACKENDS,
                        help="transformers (default) or llamacpp: both serve from the measured process")
    parser.add_argument("--iterations", type=int, default=2, help="fresh subprocesses per variant")
    parser.add_argument("--quick", action="store_true", help="1 iteration: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = 1

    from tqdm.auto import tqdm

    from phisum.generation import BASE
    from phisum.profiles import resolve_profile

    profile, _ = resolve_profile(args.profile)
    print(f"profile {profile.name}, backend {args.backend}; {load_line()}")
    with tempfile.TemporaryDirectory(prefix="phisum-mem-") as tmp:
        adapters = {n: p for n, p in profile.adapter_sources().items()
                    if (Path(p) / "adapter_model.safetensors").exists()}
        if len(adapters) < 2:
            adapters = make_standin_adapters(profile, Path(tmp))
            print(f"adapters: the profile's adapters are not there; using two stand-in LoRA adapters "
                  f"(r=16 on {', '.join(profile.lora_target_modules)}) made with peft in {tmp}")
        else:
            print(f"adapters: {adapters}")
        if args.backend == "llamacpp":
            # llama.cpp takes GGUF LoRA files: export them into the cache now, outside the measured
            # processes, as the transformers variant finds its safetensors ready too.
            from phisum.gguf_export import cached_gguf_lora

            for path in adapters.values():
                cached_gguf_lora(path, arch=profile.gguf_arch)
        names = list(adapters)
        rows = 1 + len(names)  # the same number of rows in both variants
        with_adapters = f"base + {len(names)} adapters"
        variants = {
            "base only": CHILD.format(profile=profile.name, backend=args.backend, adapters={},
                                      systems=[BASE] * rows, tag=RESULT_TAG),
            with_adapters: CHILD.format(profile=profile.name, backend=args.backend, adapters=adapters,
                                        systems=[BASE, *names], tag=RESULT_TAG),
        }
        results: dict[str, list[dict]] = {k: [] for k in variants}
        for _ in tqdm(range(args.iterations), desc="rounds (fresh subprocesses)"):
            for label, code in variants.items():
                results[label].append(run_child(code, {"HF_HUB_OFFLINE": "1"}))

    rss = {k: median([r["rss"] for r in v]) for k, v in results.items()}
    peak = {k: median([r["peak"] for r in v]) for k, v in results.items()}
    print_table("Resident memory after load + one generate (MB, median of fresh processes)",
                ["variant", "RSS MB", "peak RSS MB"], [[k, rss[k], peak[k]] for k in variants])
    ratio = rss[with_adapters] / rss["base only"]
    print(f"\n{with_adapters} / base only = {ratio:.3f}x RSS, {peak[with_adapters] / peak['base only']:.3f}x "
          f"peak (goal <= {GOAL}x: {verdict(ratio <= GOAL)})")
    print(f"after: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
