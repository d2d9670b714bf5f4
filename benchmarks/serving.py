"""Serving the app: transformers (one event at a time, and micro-batched) vs llama.cpp, side by side.

Each variant runs in a FRESH process (its RSS is its own), one after the other, on the same
dialogues (DialogSum test when ../shared/data is there). For each it measures, through the
backend contract and the real app:
  load          seconds to a ready backend with the base and both DialogSum/OASST adapters
  ttft          time to the first token: generate with max_new_tokens=1 (prefill + one step)
  decode        batch-1 decode tokens/s: (65 - 1) tokens / (time for 65 - time for 1), base model
  click         one before/after click (inference.compare_as_ready, the app's path; 96-token cap), median
                of --clicks: until both sides are done, and until the first is (where the backend
                finishes rows separately, the app shows it then)
  chat          one streamed chat reply with the oasst adapter (inference.stream_chat, 64-token cap),
                median of --repeats
  users         --users gradio_client users clicking /summarize on the real app for --duration s:
                summaries per minute (2 per click), p50/p95 latency, errors
  rss           process RSS after all of that (base + adapters + one app)
Variants:
  transformers-serial   today's transformers backend, the app running one event at a time
  transformers          the same backend, events run at once and micro-batched (the default: 16
                        rows per batch; while several users are active a batch waits up to
                        0.5 s for every active user's rows)
  transformers-nowait   micro-batched as before 2026-11-27: 8 rows per batch, no wait (in closed
                        loop the first click after a batch then runs alone)
  transformers-pools / transformers-serial-pools   transformers / transformers-serial as before
                        2026-11-27 evening: the thread that loaded the model keeps its OpenMP worker
                        pool, so the batcher thread's workers sleep between operations instead of
                        spinning (see phisum/openmp.py)
  transformers-sdpa / transformers-serial-sdpa   transformers / transformers-serial as before
                        2026-11-28: transformers' own sdpa attention, whose CPU kernel runs a decode
                        step without a padding mask (one click's rows, a chat's one row) many times
                        slower (see phisum.models.use_cpu_attention)
  llamacpp              llama.cpp in process, --slots slots, --threads threads
  llamacpp-passive      the same with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning
                        between operations: slower on an idle machine, far steadier on a shared one)

Usage:
  python benchmarks/serving.py --variants transformers-serial,transformers,llamacpp   # ~15 min
  python benchmarks/serving.py --duration 30 --variants transformers,llamacpp
  python benchmarks/serving.py --profile tiny --quick  # seconds: a smoke run (transformers only)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (backend, app concurrency or None for the backend's, environment, micro-batcher)
    "transformers-serial": ("transformers", 1, {}, {}),
    "transformers": ("transformers", None, {}, {}),
    "transformers-nowait": ("transformers", None, {}, {"batch_size": 8, "max_wait": 0.0}),
    "transformers-pools": ("transformers", None, {}, {"release_openmp": False}),
    "transformers-serial-pools": ("transformers", 1, {}, {"release_openmp": False}),
    "transformers-sdpa": ("transformers", None, {}, {"cpu_attention": False}),
    "transformers-serial-sdpa": ("transformers", 1, {}, {"cpu_attention": False}),
    "llamacpp": ("llamacpp", None, {}, {}),
    "llamacpp-passive": ("llamacpp", None, {"OMP_WAIT_POLICY": "PASSIVE"}, {}),
}


CHAT_QUESTION = "Write a short story about a lighthouse keeper and a storm."


def load(name: str, args):
    from phisum.backends import load_backend
    from phisum.profiles import get_profile

    kind = VARIANTS[name][0]
    profile = get_profile(args.profile)
    adapters = {k: v for k, v in profile.adapter_sources().items() if Path(v).exists()} or None
    if adapters is None:
        import tempfile

        from benchmarks._util import make_standin_adapters

        adapters = make_standin_adapters(profile, Path(tempfile.mkdtemp(prefix="phisum-standin-")))
    batching = VARIANTS[name][3]
    switches = {k: v for k, v in batching.items() if k in ("release_openmp", "cpu_attention")}
    if switches:  # before loading: both act while the model loads
        from phisum.backends.hf import TransformersBackend

        for key, value in switches.items():
            setattr(TransformersBackend, key, value)
    backend = load_backend(profile, kind, adapters, threads=args.threads, n_parallel=args.slots, progress=False,
                           batch_size=batching.get("batch_size"))
    if "max_wait" in batching:
        backend._batcher.max_wait = batching["max_wait"]
    return backend


def run_variant(name: str, args) -> dict:
    from gradio_client import Client

    from benchmarks._util import load_dialogues, rss_mb
    from phisum import inference
    from phisum.generation import BASE, GenerationSettings
    from tests.app_server import serve

    t0 = time.perf_counter()
    backend = load(name, args)
    result = {"load_seconds": time.perf_counter() - t0, "describe": backend.describe()}
    dialogues, _ = load_dialogues(max(args.clicks, args.users) + 2)
    prompt, _ = inference.fit_text(backend, "dialogsum", dialogues[0], 65)
    inference.summarize(backend, dialogues[1:2], BASE, GenerationSettings(max_new_tokens=8))  # warm-up
    one, full = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        backend.generate([prompt], BASE, GenerationSettings(max_new_tokens=1))
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = backend.generate([prompt], BASE, GenerationSettings(max_new_tokens=65))[0]
        full.append((time.perf_counter() - t, out.new_tokens))
    ttft = statistics.median(one)
    result["ttft_seconds"] = ttft
    result["prompt_tokens"] = out.prompt_tokens
    result["decode_tokens_per_second"] = statistics.median((n - 1) / max(s - ttft, 1e-6) for s, n in full)
    result["decode_new_tokens"] = [n for _, n in full]
    clicks, firsts = [], []
    for dialogue in dialogues[:args.clicks]:
        t, first = time.perf_counter(), None
        for _ in inference.compare_as_ready(backend, dialogue, settings=GenerationSettings(max_new_tokens=96)):
            first = first or time.perf_counter() - t
        firsts.append(first)
        clicks.append(time.perf_counter() - t)
    result["click_seconds"], result["click_first_seconds"] = clicks, firsts
    result["click_p50"], result["click_first_p50"] = statistics.median(clicks), statistics.median(firsts)
    chats = []  # the chat tab's path: a 64-token streamed reply, consumed to its end
    for _ in range(args.repeats if "oasst" in backend.adapters else 0):
        t = time.perf_counter()
        for _piece in inference.stream_chat(backend, [{"role": "user", "content": CHAT_QUESTION}], "oasst",
                                            GenerationSettings(max_new_tokens=64)):
            pass
        chats.append(time.perf_counter() - t)
    result["chat_seconds"] = statistics.median(chats) if chats else float("nan")
    with serve(backend, concurrency=VARIANTS[name][1]) as (url, _):
        result.update(drive_users(url, dialogues, args, Client))
    result["rss_mb"] = rss_mb()
    backend.close()
    return result


def drive_users(url: str, dialogues: list[str], args, client_class) -> dict:
    """--users clients clicking /summarize (base vs the adapter, 96 tokens) until --duration is up."""
    latencies, errors, lock = [], [], threading.Lock()
    start = time.perf_counter()
    stop_at = start + args.duration

    def user(index: int):
        client = client_class(url, verbose=False)
        k = index
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                client.predict(dialogues[k % len(dialogues)], 96, False, 0.7, 0.9, api_name="/summarize")
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as exc:  # counted: the goal is none
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            k += args.users

    threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    minutes = (time.perf_counter() - start) / 60
    ordered = sorted(latencies) or [float("nan")]
    return {"users": args.users, "clicks": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "summaries_per_minute": 2 * len(latencies) / minutes,
            "latency_p50": ordered[len(ordered) // 2], "latency_p95": ordered[min(len(ordered) - 1,
                                                                                   int(0.95 * len(ordered)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="embedded", choices=("embedded", "tiny"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--duration", type=float, default=120, help="seconds of concurrent users per variant")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=5, help="single before/after clicks timed one by one")
    parser.add_argument("--repeats", type=int, default=3, help="ttft/decode measurements (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="llama.cpp parallel slots")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 s of 2 users, 1 click")
    parser.add_argument("--iterations", type=int, default=1, help="rounds over the variants (fresh processes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.users, args.clicks, args.repeats = 5, 2, 1, 1
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.profile == "tiny":
        names = [n for n in names if VARIANTS[n][0] == "transformers"]  # the tiny profile has no GGUF
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant {unknown[0] if unknown else '(none)'}; choose from {', '.join(VARIANTS)}")
    from benchmarks._util import RESULT_TAG, load_line

    if args.one:
        print(RESULT_TAG + json.dumps(run_variant(args.one, args), default=str))
        return 0
    import os
    import subprocess

    print(f"{args.profile}: {', '.join(names)}; {args.users} users x {args.duration:.0f} s; {load_line()}", flush=True)
    results: dict[str, list[dict]] = {}
    passthrough = ["--profile", args.profile, "--duration", str(args.duration), "--users", str(args.users),
                   "--clicks", str(args.clicks), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--slots", str(args.slots)]
    for _ in range(args.iterations):
        for name in names:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", **VARIANTS[name][2]}
            proc = subprocess.run([sys.executable, __file__, "--one", name, *passthrough], capture_output=True,
                                  text=True, cwd=ROOT, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
            if line is None:
                print(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.setdefault(name, []).append(json.loads(line[len(RESULT_TAG):]))
            print(f"  {name}: done ({load_line()})", flush=True)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def report(results: dict[str, list[dict]], args) -> None:
    from benchmarks._util import load_line, print_table

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    rows = [[name, med(name, "load_seconds"), med(name, "ttft_seconds"), med(name, "decode_tokens_per_second"),
             med(name, "click_p50"), med(name, "click_first_p50"), med(name, "chat_seconds"),
             med(name, "summaries_per_minute"), med(name, "latency_p50"),
             med(name, "latency_p95"), sum(r["errors"] for r in results[name]), med(name, "rss_mb")]
            for name in results]
    print_table(f"Serving ({args.users} users x {args.duration:.0f} s through the app; medians over "
                f"{args.iterations} round(s))",
                ["variant", "load s", "ttft s", "decode tok/s", "click p50 s", "first side s", "chat s",
                 "summaries/min", "p50 s", "p95 s", "errors", "RSS MB"], rows)
    base = "transformers-serial" if "transformers-serial" in results else None
    for name in results:
        if name != base and base:
            rate = med(name, 'summaries_per_minute') / med(base, 'summaries_per_minute')
            print(f"{name} vs transformers-serial: summaries/min {rate:.2f}x, "
                  f"decode {med(name, 'decode_tokens_per_second') / med(base, 'decode_tokens_per_second'):.2f}x, "
                  f"RSS {med(name, 'rss_mb') / med(base, 'rss_mb'):.2f}x, "
                  f"click {med(name, 'click_p50') / med(base, 'click_p50'):.2f}x, "
                  f"chat {med(name, 'chat_seconds') / med(base, 'chat_seconds'):.2f}x")
    for name in results:
        p50, p95 = med(name, "latency_p50"), med(name, "latency_p95")
        print(f"{name}: p95/p50 = {p95 / p50:.2f}; errors {[r['error_samples'] for r in results[name] if r['errors']]}")
    print(load_line())


if __name__ == "__main__":
    sys.exit(main())
