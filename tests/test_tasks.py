import pytest

from phisum import prompts


def test_dialogsum_prompt_is_the_published_template():
    assert prompts.dialogsum_prompt("  #Person1#: Hi\n#Person2#: Hey \n") == (
        "Instruct: Summarize the following conversation.\n#Person1#: Hi\n#Person2#: Hey\nOutput:\n")


def test_xsum_prompt():
    assert prompts.xsum_prompt("Rain fell.") == (
        "Article: Rain fell.\n\nSummarize the above article in one sentence.\nSummary: ")


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


def test_every_task_has_a_stop_string_for_the_next_turn():
    assert "\nInstruct:" in prompts.STOP_STRINGS["dialogsum"]
    assert "### Human:" in prompts.STOP_STRINGS["chat"]
    with pytest.raises(ValueError, match="unknown task"):
        prompts.build_prompt("poetry", "x")
