"""Tab 1: one dialogue in, two systems' summaries side by side (base vs the best adapter by default)."""

from __future__ import annotations

import gradio as gr

from phisum import inference
from phisum.generation import BASE, InputError
from phisum.tasks import TASKS
from phisum.ui.common import gpu, load_samples, make_settings, settings_accordion, user_error, word_diff

TASK = TASKS["dialogsum"]


def default_pair(backend) -> tuple[str, str]:
    """Base vs the task's adapter when it is loaded, else base vs the first adapter there is."""
    adapters = [s for s in backend.systems if s != BASE]
    right = TASK.adapter if TASK.adapter in adapters else (adapters[0] if adapters else BASE)
    return BASE, right


def _stats(g) -> str:
    rate = g.new_tokens / g.seconds if g.seconds else 0.0
    return (f"{g.new_tokens} new tokens · prompt {g.prompt_tokens} tokens · {g.seconds:.2f} s "
            f"({rate:.1f} tok/s) · stopped on **{g.finish_reason}**")


PENDING = "(still generating…)"


def summarize_pair(backend, dialogue, max_new, sample, temperature, top_p, left=None, right=None):
    """Yield (left text, left stats, right text, right stats, diff, note): a side as soon as it is
    done where the backend finishes rows separately (`compare_as_ready`), both at the end otherwise."""
    settings = make_settings(max_new, sample, temperature, top_p, backend.context_length)
    left, right = left or default_pair(backend)[0], right or default_pair(backend)[1]
    try:
        if left == right:
            done = {0: inference.summarize(backend, [dialogue], left, settings, TASK)[0]}
        else:
            done = {}
            for group in inference.compare_as_ready(backend, dialogue, (left, right), settings, TASK):
                done.update(group)
                if len(done) == 1:  # the other side is still generating
                    a, b = done.get(0), done.get(1)
                    yield (a.display if a else PENDING, _stats(a) if a else "",
                           b.display if b else PENDING, _stats(b) if b else "", [], "")
    except InputError as exc:
        raise user_error(exc) from None
    a, b = done[0], done.get(1)
    notices = list(a.notices)
    if b is None and TASK.adapter in backend.missing:
        notices.append(f"Adapter `{TASK.adapter}` is not loaded: {backend.missing[TASK.adapter]}")
        b_text, b_stats, diff = "(no fine-tuned adapter loaded)", "", []
    elif b is None:
        notices.append(f"Both sides are `{left}`: pick two different systems to compare.")
        b_text, b_stats, diff = "(the same system as on the left)", "", []
    else:
        b_text, b_stats, diff = b.display, _stats(b), word_diff(a.text, b.text)
    note = "\n\n".join(f"**Note:** {n}" for n in notices)
    yield a.display, _stats(a), b_text, b_stats, diff, note


def create_summarize_tab(backend) -> None:
    samples = load_samples()
    left_default, right_default = default_pair(backend)
    with gr.Tab("Before / after", id="summarize"):
        dialogue = gr.Textbox(label="Dialogue", lines=10, max_lines=20, elem_id="dialogue",
                              placeholder="#Person1#: ...\n#Person2#: ...")
        gr.Examples([[s["dialogue"]] for s in samples], inputs=[dialogue], label="Sample dialogues")
        with gr.Row():
            left = gr.Dropdown(backend.systems, value=left_default, label="Left: before", elem_id="left-system")
            right = gr.Dropdown(backend.systems, value=right_default, label="Right: after", elem_id="right-system")
        settings = settings_accordion(max_new_tokens=96, limit=min(512, backend.context_length // 2))
        button = gr.Button("Summarize", variant="primary", elem_id="summarize-btn")
        note = gr.Markdown(elem_id="summarize-note", label="Notes")
        with gr.Row(equal_height=True):
            with gr.Column(scale=1):
                base = gr.Textbox(label=f"Before ({left_default})", lines=5, elem_id="base-summary",
                                  interactive=False)
                base_stats = gr.Markdown(label="Before: stats")
            with gr.Column(scale=1):
                tuned = gr.Textbox(label=f"After ({right_default})", lines=5, elem_id="tuned-summary",
                                   interactive=False)
                tuned_stats = gr.Markdown(label="After: stats")
        diff = gr.HighlightedText(label="After, words that differ from before highlighted",
                                  color_map={"changed": "green"}, show_legend=False)
        left.change(lambda s: gr.update(label=f"Before ({s})"), left, base, api_name="left_label", queue=False)
        right.change(lambda s: gr.update(label=f"After ({s})"), right, tuned, api_name="right_label", queue=False)

        @gpu
        def run(text, max_new, sample, temperature, top_p, left_system, right_system):
            yield from summarize_pair(backend, text, max_new, sample, temperature, top_p, left_system, right_system)

        button.click(run, [dialogue, *settings, left, right], [base, base_stats, tuned, tuned_stats, diff, note],
                     api_name="summarize", concurrency_id="model")
