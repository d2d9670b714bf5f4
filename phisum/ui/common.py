"""Pieces shared by the tabs: the header, generation settings, samples, ZeroGPU."""

from __future__ import annotations

import difflib
import json
from functools import lru_cache

import gradio as gr

from phisum.generation import GenerationSettings, InputError
from phisum.profiles import ROOT

SAMPLES = ROOT / "assets" / "samples" / "dialogues.jsonl"

try:  # ZeroGPU Spaces: the decorator requests a GPU per call; elsewhere a no-op.
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    def gpu(fn):
        return fn


@lru_cache(maxsize=1)
def load_samples() -> list[dict]:
    return [json.loads(line) for line in SAMPLES.read_text().splitlines() if line.strip()]


def header_markdown(engine) -> str:
    info = engine.info()
    loaded = ", ".join(f"`{n}`" for n in info["adapters"]) or "none"
    lines = [
        "# PhiSUM: before and after LoRA fine-tuning",
        f"**Profile** `{info['profile']}` ({info['why']}) · **base** `{info['base_model']}` · "
        f"**device** `{info['device']}` · **dtype** `{info['dtype']}` · **adapters** {loaded}",
    ]
    for name, why in info["missing_adapters"].items():
        lines.append(f"> **Note:** Adapter `{name}` is not loaded: {why}. Its tab shows base output only until "
                     f"you train it (`python -m phisum train --config ...`) or set `PHISUM_ADAPTER_{name.upper()}`.")
    return "\n\n".join(lines)


def settings_accordion(max_new_tokens: int = 96, limit: int = 512):
    """Returns the four inputs every generating event takes."""
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            max_new = gr.Slider(8, limit, value=max_new_tokens, step=8, label="Max new tokens")
            sample = gr.Checkbox(value=False, label="Sample (off = greedy)")
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
    return [max_new, sample, temperature, top_p]


def make_settings(max_new, sample, temperature, top_p, context_length: int) -> GenerationSettings:
    try:
        return GenerationSettings(max_new_tokens=int(max_new), do_sample=bool(sample),
                                  temperature=float(temperature), top_p=float(top_p)).validate(context_length)
    except (TypeError, ValueError) as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def user_error(exc: Exception) -> gr.Error:
    """InputError and friends become a visible message; the server keeps serving."""
    if isinstance(exc, InputError):  # expected: shown to the user, not logged as a server fault
        return gr.Error(str(exc), print_exception=False)
    return gr.Error(f"{type(exc).__name__}: {exc}")


def word_diff(before: str, after: str) -> list[tuple[str, str | None]]:
    """Tokens of `after`, marked where they are new relative to `before`."""
    a, b = before.split(), after.split()
    out: list[tuple[str, str | None]] = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if j1 == j2:
            continue
        out.append((" ".join(b[j1:j2]) + " ", None if op == "equal" else "changed"))
    return out
