"""Task helpers above the backend contract: fit a prompt, summarize, compare, chat.

They build prompts from a Task (phisum.tasks), fit them to the backend's context,
and call `backend.generate` / `backend.stream`; they work the same on every
backend. Input is checked here, once, at the edge (text, settings); backends get
prompts that fit and settings that are valid.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence

from phisum.backends.base import Backend
from phisum.generation import BASE, Generation, GenerationSettings, InputError, validate_text
from phisum.prompts import chat_prompt, message_text
from phisum.tasks import Task, get_task

CHAT_TASK = "oasst"

# Text that a tokenizer would read as a control token (<eos>, </s>, <|endoftext|>,
# <start_of_turn>): typed into a dialogue it must stay text, not end the prompt.
SPECIAL_LIKE = re.compile(r"<(\|?/?[A-Za-z_][A-Za-z0-9_]{0,40}\|?)>")
WORD_JOINER = "\u2060"


def literal(text: str) -> str:
    """`text` with control-token look-alikes broken by an invisible word joiner."""
    return SPECIAL_LIKE.sub(lambda m: f"<{WORD_JOINER}{m.group(1)}>", text)


def fit_text(backend: Backend, task: str | Task, text, max_new_tokens: int) -> tuple[str, list[str]]:
    """The task prompt for `text`; the text is cut from the front if prompt plus
    `max_new_tokens` would not fit the context. Returns (prompt, notices)."""
    task = get_task(task)
    text = literal(validate_text(text, task.input_word))
    overhead = backend.count_tokens(task.prompt("")) + 4
    budget = backend.context_length - max_new_tokens - overhead
    if budget < 16:
        raise InputError(f"max new tokens {max_new_tokens} leaves no room for the {task.input_word} in the "
                         f"{backend.context_length}-token context")
    notices = []
    # Character pre-cut keeps tokenizing a pasted book cheap; tokens decide below.
    chars = text[-budget * 16:] if len(text) > budget * 16 else text
    ids = backend.tokenize(chars)
    if len(ids) > budget or chars is not text:
        kept = backend.detokenize(ids[-budget:])
        line = kept.find("\n")
        if 0 <= line < len(kept) // 4:  # start on a whole turn when one is near
            kept = kept[line + 1:]
        total = len(ids) if chars is text else f"about {len(text) // 4}"
        notices.append(f"Input truncated: it was {total} tokens; kept the last {backend.count_tokens(kept)} "
                       f"tokens so prompt plus {max_new_tokens} new tokens fit the "
                       f"{backend.context_length}-token context.")
        text = kept
    return task.prompt(text), notices


def fit_chat(backend: Backend, messages: Sequence[Mapping], max_new_tokens: int,
             task: str | Task = CHAT_TASK) -> tuple[str, list[str]]:
    """Chat prompt; drop the oldest turns when the history outgrows the context."""
    task = get_task(task)
    if not messages or messages[-1].get("role") != "user":
        raise InputError("the conversation must end with a user message")
    last = {"role": "user", "content": literal(validate_text(message_text(messages[-1]), task.input_word))}
    turns = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")]
    history = [{"role": m["role"], "content": literal(message_text(m))} for m in turns]
    budget = backend.context_length - max_new_tokens
    notices = []
    while True:
        prompt = chat_prompt([*history, last])
        if backend.count_tokens(prompt) <= budget:
            break
        if history:
            history = history[2:] if len(history) > 1 else []
            continue
        cut, more = fit_text(backend, task, last["content"], max_new_tokens)
        return cut, notices + more + ["Earlier turns were dropped to fit the context."] * bool(turns)
    if len(history) < len(turns):
        notices.append("The oldest turns were dropped to fit the context.")
    return prompt, notices


def summarize(backend: Backend, texts: Sequence[str], system: str | None = None,
              settings: GenerationSettings | None = None, task: str | Task = "dialogsum",
              batch_size: int | None = None) -> list[Generation]:
    """One summary per text from one system (default: the task's adapter)."""
    task = get_task(task)
    settings = (settings or GenerationSettings()).validate(backend.context_length)
    system = system or task.adapter
    backend.require(system)
    built = [fit_text(backend, task, t, settings.max_new_tokens) for t in texts]
    outs = backend.generate([p for p, _ in built], system, settings, task.stops, batch_size)
    for out, (_, notices) in zip(outs, built):
        out.notices.extend(notices)
    return outs


def _pair_rows(backend: Backend, texts: Sequence[str], systems, settings, task):
    """Prompts for two systems over `texts`: (task, settings, rows, row systems, notices per text)."""
    task = get_task(task)
    first, second = systems or (BASE, task.adapter)
    if first == second:
        raise InputError(f"compare two different systems, got {first!r} twice")
    settings = (settings or GenerationSettings()).validate(backend.context_length)
    backend.require(first)
    backend.require(second)
    built = [fit_text(backend, task, t, settings.max_new_tokens) for t in texts]
    prompts = [p for p, _ in built]
    return task, settings, prompts + prompts, [first] * len(prompts) + [second] * len(prompts), [n for _, n in built]


def compare(backend: Backend, texts: Sequence[str], systems: Sequence[str] | None = None,
            settings: GenerationSettings | None = None, task: str | Task = "dialogsum",
            batch_size: int | None = None) -> list[tuple[Generation, Generation]]:
    """Two systems' outputs for each text (default: base vs the task's adapter), all rows in ONE
    generate call, so the backend can batch them together (peft adapter_names, server slots)."""
    task, settings, rows, names, notices = _pair_rows(backend, texts, systems, settings, task)
    outs = backend.generate(rows, names, settings, task.stops, batch_size)
    pairs = []
    for i, found in enumerate(notices):
        a, b = outs[i], outs[len(notices) + i]
        a.notices.extend(found)
        b.notices.extend(found)
        pairs.append((a, b))
    return pairs


def compare_as_ready(backend: Backend, text: str, systems: Sequence[str] | None = None,
                     settings: GenerationSettings | None = None,
                     task: str | Task = "dialogsum") -> Iterator[list[tuple[int, Generation]]]:
    """`compare` for one text, yielding [(0 for the first system or 1 for the second, its
    Generation), ...] as they are done (see `Backend.generate_as_ready`): where the backend finishes
    rows separately (a server's slots), the shorter summary can be shown while the other generates."""
    task, settings, rows, names, notices = _pair_rows(backend, [text], systems, settings, task)
    for group in backend.generate_as_ready(rows, names, settings, task.stops):
        for _, out in group:
            out.notices.extend(notices[0])
        yield group


def stream_chat(backend: Backend, messages: Sequence[Mapping], system: str | None = None,
                settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                notices: list | None = None, task: str | Task = CHAT_TASK) -> Iterator[str]:
    """Yield the reply as it grows. Closing the generator stops generation.
    Truncation notices are appended to `notices` when a list is given."""
    task = get_task(task)
    settings = (settings or GenerationSettings(max_new_tokens=256)).validate(backend.context_length)
    system = system or task.adapter
    backend.require(system)
    prompt, found = fit_chat(backend, messages, settings.max_new_tokens, task)
    if notices is not None:
        notices.extend(found)
    yield from backend.stream(prompt, system, settings, task.stops, cancel)
