"""The chat template (oasst1 / Guanaco `### Human:` / `### Assistant:` turns).

Training targets and inference prompts are built from the same functions so a
fine-tuned adapter always sees at inference the exact text it was trained on.
Per-task prompt templates live in phisum.tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

HUMAN = "### Human:"
ASSISTANT = "### Assistant:"


def message_text(message: Mapping) -> str:
    """gradio 6 may hand content as a list of {"type": "text", "text": ...} parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def chat_turn(role: str, text: str) -> str:
    tag = HUMAN if role == "user" else ASSISTANT
    return f"{tag} {text.strip()}\n"


def chat_prompt(messages: Iterable[Mapping]) -> str:
    """`### Human: ...` and `### Assistant: ...` turns, ending with the assistant tag so the
    model writes the next reply. System messages are not part of the oasst1 data: dropped."""
    lines = []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        lines.append(chat_turn(role, message_text(message)))
    return "".join(lines) + ASSISTANT


def split_chat_for_training(messages: list[Mapping]) -> tuple[str, str]:
    """Prompt = all turns before the last assistant reply; completion = that reply."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    prompt = chat_prompt(messages[:-1])
    return prompt, " " + message_text(messages[-1]).strip()
