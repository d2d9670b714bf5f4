"""Tab 2: multi-turn streaming chat with the oasst adapter (or the base, to compare)."""

from __future__ import annotations

import gradio as gr

from phisum import inference
from phisum.generation import BASE, InputError
from phisum.tasks import TASKS
from phisum.ui.common import gpu, make_settings, settings_accordion, user_error

TASK = TASKS["oasst"]
ADAPTER = TASK.adapter
CHAT_REPETITION_PENALTY = 1.15
EXAMPLES = ["What are three tips for staying focused while studying?",
            "Explain what a LoRA adapter is in two sentences.",
            "Write a short, friendly reminder to water the plants."]


def answering(backend, use_base: bool) -> str:
    if use_base:
        return f"Answering: **base model** `{backend.profile.base_model}` (no adapter), for comparison."
    if ADAPTER in backend.adapters:
        return f"Answering: `{backend.profile.base_model}` + **`{ADAPTER}` adapter** (OASST1-tuned)."
    why = backend.missing.get(ADAPTER, "not configured")
    return f"**Note:** The `{ADAPTER}` adapter is not loaded ({why}); the **base model** answers instead."


def chat_reply(backend, message, history, use_base, max_new, sample, temperature, top_p):
    """Generator: yields the growing reply. Gradio closes it on Stop, which cancels generation."""
    system = BASE if use_base or ADAPTER not in backend.adapters else ADAPTER
    settings = make_settings(max_new, sample, temperature, top_p, backend.context_length)
    # Small chat adapters loop under greedy decoding ("I've been writing for a long time. I've been...");
    # a mild penalty keeps replies readable and is stated in the tab.
    settings.repetition_penalty = CHAT_REPETITION_PENALTY
    if isinstance(message, dict):  # multimodal-style payloads from API clients
        message = message.get("text", "")
    messages = [m for m in (history or []) if isinstance(m, dict)] + [{"role": "user", "content": message}]
    notices: list[str] = []
    stream = inference.stream_chat(backend, messages, system, settings, notices=notices, task=TASK)
    try:
        text = ""
        for text in stream:
            yield text
        if not text.strip():
            yield "(empty reply: the model stopped before writing anything)"
        elif notices:
            gr.Info(" ".join(notices))
    except InputError as exc:
        raise user_error(exc) from None
    finally:
        stream.close()


def create_chat_tab(backend) -> None:
    with gr.Tab("Chat", id="chat"):
        use_base = gr.Checkbox(value=False, label="Chat with the base model instead (for comparison)",
                               elem_id="chat-use-base")
        note = gr.Markdown(answering(backend, False), elem_id="chat-note", label="Who answers")
        gr.Markdown(f"Replies use a repetition penalty of {CHAT_REPETITION_PENALTY}; the Stop button "
                    "ends generation at once.")
        settings = settings_accordion(max_new_tokens=192, limit=min(512, backend.context_length // 2))
        use_base.change(lambda b: answering(backend, b), use_base, note, api_name="chat_model",
                        queue=False)

        @gpu
        def respond(message, history, base, max_new, sample, temperature, top_p):
            yield from chat_reply(backend, message, history, base, max_new, sample, temperature, top_p)

        gr.ChatInterface(
            respond,
            chatbot=gr.Chatbot(height=420, elem_id="chatbot", label="Conversation"),
            textbox=gr.Textbox(placeholder="Ask something…", elem_id="chat-input", submit_btn=True,
                               stop_btn=True, show_label=False),
            additional_inputs=[use_base, *settings],
            examples=[[e] for e in EXAMPLES],
            api_name="chat",
            concurrency_limit=backend.max_concurrency,
        )
