"""The Gradio app: one module per tab, each with a create_<tab>_tab(backend) factory."""

from __future__ import annotations

from phisum.startup import frozen_imports

with frozen_imports():
    import gradio as gr

from phisum.ui.chat_tab import create_chat_tab
from phisum.ui.common import header_markdown
from phisum.ui.rouge_tab import create_rouge_tab
from phisum.ui.summarize_tab import create_summarize_tab

QUEUE_PER_SLOT = 4  # waiting events per event the backend runs at once; past that, "queue is full"
THEME = gr.themes.Soft()
CSS = "#base-summary textarea, #tuned-summary textarea {font-size: 1rem}"
MAX_FILE_SIZE = "1mb"  # the app takes no uploads; this caps Gradio's upload route
CACHE_CLEANUP = (300, 900)  # Gradio's own file cache: every 5 min, drop files older than 15 min


def launch_options() -> dict:
    """What `demo.launch` needs besides host and port (gradio 6 takes theme and css here)."""
    return {"theme": THEME, "css": CSS, "max_file_size": MAX_FILE_SIZE}


def build_demo(backend, dialogsum_dir: str | None = None, hub: bool = False,
               concurrency: int | None = None) -> gr.Blocks:
    """The three-tab app on one backend (phisum.backends.load_backend).

    dialogsum_dir: local DialogSum folder for the live ROUGE tab; hub: whether that tab may
    try the Hub dataset (False offline); concurrency: events run at once (default: what the
    backend batches, `backend.max_concurrency`; 1 serves one event at a time)."""
    concurrency = concurrency or backend.max_concurrency
    with gr.Blocks(title="PhiSUM", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(header_markdown(backend), elem_id="header")
        with gr.Tabs():
            create_summarize_tab(backend)
            create_chat_tab(backend)
            folders = create_rouge_tab(backend, dialogsum_dir, hub)
    # The backend batches what runs at once (micro-batching, server slots); a bounded queue
    # refuses the overflow with a clear "queue is full" message.
    demo.queue(max_size=QUEUE_PER_SLOT * max(concurrency, 4), default_concurrency_limit=concurrency)
    demo.backend = backend
    demo.run_folders = folders
    return demo
