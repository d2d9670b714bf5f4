"""Tasks as data: everything phisum knows about a task lives in one record here.

A Task says where its data comes from and what its rows hold (loader, input and
reference fields), how a prompt is built and where a model that does not stop at
EOS would begin the next example (stop strings), how rows become training
examples, what users call its input, which adapter serves it, and what a model
card says about it. Task lists, argparse choices, prompts, stops and card text all
read from TASKS; a new task is one `register_task(Task(...))`, in this file or in
a user's own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from phisum import data
from phisum.prompts import ASSISTANT, HUMAN

DIALOGSUM_PROMPT = "Instruct: Summarize the following conversation.\n{input}\nOutput:\n"
XSUM_PROMPT = "Article: {input}\n\nSummarize the above article in one sentence.\nSummary: "


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    kind: str  # "summarize": one text in, reference summaries out (ROUGE-scored); "chat": conversations
    hub_dataset: str
    load: Callable  # (source, split, **options) -> (rows, DataReport); source None = hub_dataset
    input_field: str  # the row field a prompt is built from
    reference_field: str  # the row field with the reference(s): one string or a list of strings
    input_word: str  # what users call the input: "dialogue", "article", "message"
    adapter: str  # the adapter that serves this task by default
    template: str  # the prompt, "{input}" marking the text (a chat task's: its one-turn prompt)
    stops: tuple[str, ...]  # where a model that does not stop would write the next example
    card_text: str  # completes "trained with PhiSUM for ..."
    card_tags: tuple[str, ...] = ()
    holdout: Callable | None = None  # (rows, fraction) -> (train, eval) when one file has both

    def prompt(self, text: str) -> str:
        return self.template.format(input=text.strip())

    def text(self, row: dict) -> str:
        return row[self.input_field]

    def references(self, row: dict) -> list[str]:
        refs = row[self.reference_field]
        return [refs] if isinstance(refs, str) else list(refs)

    def examples(self, rows: list[dict], eos_token: str) -> list[dict]:
        """prompt/completion rows for SFT: one per reference, EOS on every target."""
        if self.kind == "chat":
            return data.chat_examples(rows, eos_token)
        return [{"prompt": self.prompt(self.text(row)), "completion": data.with_eos(ref, eos_token)}
                for row in rows for ref in self.references(row)]


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.kind not in ("summarize", "chat"):
        raise ValueError(f"task {task.name!r}: kind must be 'summarize' or 'chat', got {task.kind!r}")
    TASKS[task.name] = task
    return task


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def summarization_tasks() -> list[str]:
    """Tasks ROUGE can score: those with reference summaries."""
    return [name for name, task in TASKS.items() if task.kind == "summarize"]


register_task(Task(
    name="dialogsum", title="DialogSum", kind="summarize", hub_dataset=data.DIALOGSUM_HUB_ID,
    load=data.load_dialogsum, input_field="dialogue", reference_field="summaries", input_word="dialogue",
    adapter="dialogsum", template=DIALOGSUM_PROMPT, stops=("\nInstruct:",),
    card_text="summarising dialogues (DialogSum)", card_tags=("summarization", "dialogue-summarization")))

register_task(Task(
    name="xsum", title="XSum", kind="summarize", hub_dataset=data.XSUM_HUB_ID,
    load=data.load_xsum, input_field="document", reference_field="summary", input_word="article",
    adapter="xsum", template=XSUM_PROMPT, stops=("\nArticle:",),
    card_text="one-sentence news summaries (XSum)", card_tags=("summarization", "news")))

register_task(Task(
    name="oasst", title="OpenAssistant chat", kind="chat", hub_dataset=data.OASST_HUB_ID,
    load=data.load_oasst, input_field="messages", reference_field="messages", input_word="message",
    adapter="oasst", template=f"{HUMAN} {{input}}\n{ASSISTANT}", stops=(HUMAN,),
    card_text="chat (OpenAssistant conversations)", card_tags=("conversational", "chat"),
    holdout=data.split_by_tree))
