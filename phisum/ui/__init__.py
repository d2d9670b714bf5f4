"""The Gradio app: one module per tab, each with a create_<tab>_tab(engine) factory."""

from __future__ import annotations

from phisum.startup import frozen_imports

with frozen_imports():
    import gradio as gr

from phisum.ui.common import header_markdown
from phisum.ui.chat_tab import create_chat_tab
from phisum.ui.rouge_tab import create_rouge_tab
from phisum.ui.summarize_tab import create_summarize_tab

QUEUE_SIZE = 16
THEME = gr.themes.Soft()
CSS = "#base-summary textarea, #tuned-summary textarea {font-size: 1rem}"


def build_demo(engine=None, dialogsum_dir: str | None = None) -> gr.Blocks:
    """The three-tab app on one engine (loaded from PHISUM_PROFILE when not given)."""
    if engine is None:
        from phisum.engine import Engine

        engine = Engine.load(progress=True)
    with gr.Blocks(title="PhiSUM") as demo:
        gr.Markdown(header_markdown(engine), elem_id="header")
        with gr.Tabs():
            create_summarize_tab(engine)
            create_chat_tab(engine)
            create_rouge_tab(engine, dialogsum_dir)
    # The model serves one event at a time (peft adapter state is shared);
    # a bounded queue refuses the overflow with a clear "queue is full" message.
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    demo.engine = engine
    return demo
