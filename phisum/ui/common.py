"""Pieces shared by the tabs: the header, generation settings, samples, ZeroGPU."""

from __future__ import annotations

import difflib
import json
import math
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


def header_markdown(backend) -> str:
    from phisum.config import adapter_env_name

    info = backend.describe()
    loaded = ", ".join(f"`{n}`" for n in info["adapters"]) or "none"
    where = " · ".join(f"**{k}** `{info[k]}`" for k in ("device", "dtype", "gguf", "base_url") if info.get(k))
    lines = [
        "# PhiSUM: before and after LoRA fine-tuning",
        f"**Profile** `{info['profile']}` · **backend** `{info['backend']}` · **base** `{info['base_model']}` · "
        + (f"{where} · " if where else "") + f"**adapters** {loaded}",
        f"<small>Why: {info['why']}.</small>",
    ]
    for name, why in info["missing_adapters"].items():
        lines.append(f"> **Note:** Adapter `{name}` is not loaded: {why}. Its tab shows base output only until "
                     f"you train it (`python -m phisum train --config ...`) or set `{adapter_env_name(name)}`.")
    return "\n\n".join(lines)


def checked_slider(minimum: float, maximum: float, **kwargs) -> gr.Slider:
    """A gr.Slider whose value from an API client is checked before gradio's own range check,
    which fails with a bare TypeError on null or a string (the client then sees only "the app
    raised an exception") and lets NaN through (every comparison with NaN is false). Here each
    is one line naming the slider; make_settings/as_int then see a finite number in range.
    (Not a gr.Slider subclass: gradio writes a .pyi stub beside the module of every subclass.)"""
    slider = gr.Slider(minimum, maximum, **kwargs)
    gradio_preprocess = slider.preprocess

    def preprocess(payload):
        if (isinstance(payload, bool) or not isinstance(payload, (int, float))
                or isinstance(payload, float) and not math.isfinite(payload)):
            raise gr.Error(f"{slider.label} must be a number, got {payload!r}", print_exception=False)
        if not slider.minimum <= payload <= slider.maximum:
            raise gr.Error(f"{slider.label} must be from {slider.minimum:g} to {slider.maximum:g}, "
                           f"got {payload!r}", print_exception=False)
        return gradio_preprocess(payload)

    slider.preprocess = preprocess  # gradio looks preprocess up on the instance for every event
    return slider


def settings_accordion(max_new_tokens: int = 96, limit: int = 512):
    """Returns the four inputs every generating event takes."""
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            max_new = checked_slider(8, limit, value=max_new_tokens, step=8, label="Max new tokens")
            sample = gr.Checkbox(value=False, label="Sample (off = greedy)")
            temperature = checked_slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
            top_p = checked_slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
    return [max_new, sample, temperature, top_p]


def make_settings(max_new, sample, temperature, top_p, context_length: int) -> GenerationSettings:
    """Settings from the raw widget values, validated once here at the edge (API clients can
    send anything: null, NaN, strings)."""
    try:
        return GenerationSettings(max_new_tokens=as_int(max_new, "max new tokens"),
                                  do_sample=as_bool(sample, "sample"),
                                  temperature=as_float(temperature, "temperature"),
                                  top_p=as_float(top_p, "top-p")).validate(context_length)
    except (TypeError, ValueError) as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def as_int(value, what: str, low: int | None = None, high: int | None = None) -> int:
    """A whole number from a widget or an API client, or InputError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{what} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{what} must be a whole number, got {value!r}")
    number = int(number)
    if (low is not None and number < low) or (high is not None and number > high):
        raise InputError(f"{what} must be from {low} to {high}, got {number}")
    return number


def as_bool(value, what: str) -> bool:
    """A checkbox value: true or false, not a string that bool() would read as true."""
    if not isinstance(value, bool):
        raise InputError(f"{what} must be true or false, got {value!r}")
    return value


def as_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return number


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
