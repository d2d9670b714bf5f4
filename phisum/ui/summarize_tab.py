"""Tab 1: one dialogue in, base and fine-tuned summaries side by side."""

from __future__ import annotations

import gradio as gr

from phisum.generation import BASE, InputError
from phisum.ui.common import gpu, load_samples, make_settings, settings_accordion, user_error, word_diff

ADAPTER = "dialogsum"


def _stats(g) -> str:
    rate = g.new_tokens / g.seconds if g.seconds else 0.0
    return (f"{g.new_tokens} new tokens · prompt {g.prompt_tokens} tokens · {g.seconds:.2f} s "
            f"({rate:.1f} tok/s) · stopped on **{g.finish_reason}**")


def summarize_pair(engine, dialogue, max_new, sample, temperature, top_p):
    settings = make_settings(max_new, sample, temperature, top_p, engine.profile.context_length)
    try:
        if ADAPTER in engine.adapters:
            base, tuned = engine.compare([dialogue], ADAPTER, settings)[0]
        else:
            base = engine.summarize([dialogue], BASE, settings)[0]
            tuned = None
    except InputError as exc:
        raise user_error(exc) from None
    notices = list(base.notices)
    if tuned is None:
        notices.append(f"Adapter `{ADAPTER}` is not loaded: {engine.missing.get(ADAPTER, 'not configured')}")
        tuned_text, tuned_stats, diff = "(no fine-tuned adapter loaded)", "", []
    else:
        tuned_text, tuned_stats = tuned.display, _stats(tuned)
        diff = word_diff(base.text, tuned.text)
    note = "\n\n".join(f"**Note:** {n}" for n in notices)
    return base.display, _stats(base), tuned_text, tuned_stats, diff, note


def create_summarize_tab(engine) -> None:
    samples = load_samples()
    with gr.Tab("Before / after", id="summarize"):
        dialogue = gr.Textbox(label="Dialogue", lines=10, max_lines=20, elem_id="dialogue",
                              placeholder="#Person1#: ...\n#Person2#: ...")
        gr.Examples([[s["dialogue"]] for s in samples], inputs=[dialogue], label="Sample dialogues")
        settings = settings_accordion(max_new_tokens=96, limit=min(512, engine.profile.context_length // 2))
        button = gr.Button("Summarize", variant="primary", elem_id="summarize-btn")
        note = gr.Markdown(elem_id="summarize-note")
        with gr.Row(equal_height=True):
            with gr.Column(scale=1):
                base = gr.Textbox(label=f"Base model ({engine.profile.base_model})", lines=5,
                                  elem_id="base-summary", interactive=False)
                base_stats = gr.Markdown()
            with gr.Column(scale=1):
                tuned = gr.Textbox(label=f"Fine-tuned ({ADAPTER} adapter)", lines=5,
                                   elem_id="tuned-summary", interactive=False)
                tuned_stats = gr.Markdown()
        diff = gr.HighlightedText(label="Fine-tuned summary, words that differ from the base highlighted",
                                  color_map={"changed": "green"}, show_legend=False)

        @gpu
        def run(text, max_new, sample, temperature, top_p):
            return summarize_pair(engine, text, max_new, sample, temperature, top_p)

        button.click(run, [dialogue, *settings], [base, base_stats, tuned, tuned_stats, diff, note],
                     api_name="summarize", concurrency_id="model")
