"""Every prompt template PhiSUM uses, in one place.

Training targets and inference prompts are built from the same functions so a
fine-tuned adapter always sees at inference the exact text it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DIALOGSUM_PROMPT = "Instruct: Summarize the following conversation.\n{dialogue}\nOutput:\n"
XSUM_PROMPT = "Article: {article}\n\nSummarize the above article in one sentence.\nSummary: "
HUMAN = "### Human:"
ASSISTANT = "### Assistant:"

# Where a model that does not stop at EOS would start writing the next example.
STOP_STRINGS = {
    "dialogsum": ("\nInstruct:",),
    "xsum": ("\nArticle:",),
    "chat": (HUMAN,),
}

TASKS = tuple(STOP_STRINGS)


def dialogsum_prompt(dialogue: str) -> str:
    return DIALOGSUM_PROMPT.format(dialogue=dialogue.strip())


def xsum_prompt(article: str) -> str:
    return XSUM_PROMPT.format(article=article.strip())


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
    """oasst1 / Guanaco template: `### Human: ...` and `### Assistant: ...` turns.

    The prompt ends with the assistant tag so the model writes the next reply.
    System messages are not part of the oasst1 data, so they are dropped here.
    """
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


def build_prompt(task: str, text: str) -> str:
    if task == "dialogsum":
        return dialogsum_prompt(text)
    if task == "xsum":
        return xsum_prompt(text)
    if task == "chat":
        return chat_prompt([{"role": "user", "content": text}])
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
