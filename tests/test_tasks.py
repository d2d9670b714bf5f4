"""Tasks as data: templates, stops, references, training examples, and registering a new task."""

import json

import pytest

from phisum import prompts
from phisum.data import DataReport
from phisum.tasks import TASKS, Task, get_task, register_task, summarization_tasks


def test_dialogsum_prompt_is_the_published_template():
    assert TASKS["dialogsum"].prompt("  #Person1#: Hi\n#Person2#: Hey \n") == (
        "Instruct: Summarize the following conversation.\n#Person1#: Hi\n#Person2#: Hey\nOutput:\n")


def test_xsum_prompt_is_the_recipe_template():
    assert TASKS["xsum"].prompt("Rain fell.") == (
        "Article: Rain fell.\n\nSummarize the above article in one sentence.\nSummary: ")


def test_chat_task_prompt_is_the_one_turn_chat_prompt():
    assert TASKS["oasst"].prompt(" Hi ") == prompts.chat_prompt([{"role": "user", "content": "Hi"}])


def test_chat_prompt_alternates_and_ends_on_assistant_tag():
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert prompts.chat_prompt(messages) == (
        "### Human: Hi\n### Assistant: Hello!\n### Human: Tell me a joke\n### Assistant:")


def test_training_split_puts_last_reply_in_completion():
    prompt, completion = prompts.split_chat_for_training(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A "}])
    assert prompt == "### Human: Q\n### Assistant:" and completion == " A"
    with pytest.raises(ValueError):
        prompts.split_chat_for_training([{"role": "user", "content": "Q"}])


def test_every_task_has_a_stop_string_for_the_next_example():
    assert "\nInstruct:" in TASKS["dialogsum"].stops and "\nArticle:" in TASKS["xsum"].stops
    assert "### Human:" in TASKS["oasst"].stops
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        get_task("poetry")
    assert set(summarization_tasks()) >= {"dialogsum", "xsum"} and "oasst" not in summarization_tasks()


def test_references_and_examples_follow_the_fields():
    row = {"id": "x", "document": "A long article.", "summary": "Short."}
    assert TASKS["xsum"].references(row) == ["Short."]
    assert TASKS["xsum"].examples([row], "</s>") == [
        {"prompt": TASKS["xsum"].prompt("A long article."), "completion": "Short.</s>"}]
    multi = {"id": "y", "dialogue": "#Person1#: Hi.", "summaries": ["One.", "Two."]}
    assert [e["completion"] for e in TASKS["dialogsum"].examples([multi], "<eos>")] == ["One.<eos>", "Two.<eos>"]


def test_a_toy_task_registers_in_a_few_lines_and_evaluates(tmp_path, tiny_backend):
    """A new task is one record: the evaluator, prompts and stops follow it with no other change."""
    from phisum.evaluation import evaluate

    def load_headlines(source, split="test", **_):
        rows = [json.loads(line) for line in open(source, encoding="utf-8")]
        return rows, DataReport(str(source), split, len(rows), len(rows))

    toy = register_task(Task(
        name="headline", title="Headlines", kind="summarize", hub_dataset="nobody/headlines", load=load_headlines,
        input_field="story", reference_field="headline", input_word="story", adapter="dialogsum",
        template="Story: {input}\nHeadline:", stops=("\nStory:",), card_text="headlines"))
    try:
        path = tmp_path / "headlines.jsonl"
        path.write_text("\n".join(json.dumps({"id": f"h{i}", "story": f"Story number {i} about rain.",
                                              "headline": f"Rain {i}"}) for i in range(3)))
        rows, _ = toy.load(path)
        report = evaluate(tiny_backend, rows, task="headline", settings=None, batch_size=4)
        assert report.task == "headline" and len(report.rows) == 3
        assert report.rows[0]["input"] == "Story number 0 about rain." and report.rows[0]["references"] == ["Rain 0"]
        assert "headline" in summarization_tasks()
    finally:
        TASKS.pop("headline")
