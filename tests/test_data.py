"""Data loaders: oasst1 tree rebuild and split, XSum, prompt/completion rows with EOS."""

import json

import pytest

from phisum import data
from phisum.tasks import TASKS
from tests.conftest import require_data


def msg(mid, parent, role, text, rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en",
            "deleted": False, "review_result": True, "message_tree_id": "t1" if mid.startswith("a") else mid,
            **extra}


TREE = [
    msg("a0", None, "prompter", "How do I boil an egg?"),
    msg("a1", "a0", "assistant", "Second-best answer.", rank=1),
    msg("a2", "a0", "assistant", "Best answer: ten minutes.", rank=0),
    msg("a3", "a0", "assistant", "Deleted answer.", rank=None, deleted=True),
    msg("a4", "a2", "prompter", "And soft-boiled?"),
    msg("a5", "a4", "assistant", "Rejected reply.", rank=0, review_result=False),
    msg("a6", "a4", "assistant", "Six minutes.", rank=1),
    msg("a7", "a5", "prompter", "Orphan under a rejected reply."),
    msg("b0", None, "prompter", "Bonjour ?", lang="fr"),
    msg("b1", "b0", "assistant", "Salut !", rank=0, lang="fr"),
    {"message_id": "c0", "parent_id": None, "role": "prompter", "text": "  "},
]


def test_oasst_tree_follows_best_ranked_kept_replies():
    report = data.DataReport("hand-made", "train", rows_read=len(TREE))
    conversations = data.build_oasst_conversations(TREE, lang="en", report=report)
    assert len(conversations) == 1
    assert conversations[0]["tree_id"] == "t1"
    assert [m["content"] for m in conversations[0]["messages"]] == [
        "How do I boil an egg?", "Best answer: ten minutes.", "And soft-boiled?", "Six minutes."]
    assert [m["role"] for m in conversations[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert report.bad["deleted message"] == 1 and report.bad["message rejected in review"] == 1
    assert report.bad["empty message text"] == 1 and report.bad["reply whose parent was dropped or is missing"] == 1
    assert report.bad["tree not in language 'en'"] == 1
    assert "skipped" in report.summary()


def test_oasst_language_filter_off_keeps_other_languages():
    conversations = data.build_oasst_conversations(TREE, lang=None)
    assert {c["lang"] for c in conversations} == {"en", "fr"}


def test_chat_examples_one_per_reply_with_eos_and_template():
    conversations = data.build_oasst_conversations(TREE, lang="en")
    examples = data.chat_examples(conversations, "<EOS>")
    assert len(examples) == 2
    assert examples[0]["prompt"] == "### Human: How do I boil an egg?\n### Assistant:"
    assert examples[0]["completion"] == " Best answer: ten minutes.<EOS>"
    assert examples[1]["prompt"].endswith("### Human: And soft-boiled?\n### Assistant:")
    assert all(e["completion"].endswith("<EOS>") and not e["completion"].endswith("<EOS><EOS>") for e in examples)


def test_split_by_tree_is_deterministic_and_disjoint():
    conversations = [{"tree_id": f"tree{i}", "messages": []} for i in range(200)]
    train, held = data.split_by_tree(conversations, 0.2)
    assert 20 < len(held) < 60 and len(train) + len(held) == 200
    assert {c["tree_id"] for c in train}.isdisjoint({c["tree_id"] for c in held})
    assert data.split_by_tree(conversations, 0.2)[1] == held


def test_real_oasst_file_rebuild_and_split():
    raw = require_data("oasst") / "oasst1_en_validation_raw.jsonl"
    if not raw.exists():
        pytest.skip(f"{raw} not found")
    conversations, report = data.load_oasst(raw, "validation")
    assert report.rows_read == 2022 and len(conversations) > 150
    assert report.bad["deleted message"] > 0  # the real file has deleted messages: counted, not hidden
    train, held = data.split_by_tree(conversations, 0.1)
    assert held and {c["tree_id"] for c in train}.isdisjoint({c["tree_id"] for c in held})
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_oasst_refuses_flattened_file(tmp_path):
    path = tmp_path / "flat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(data.DataError, match="message_id"):
        data.load_oasst(path)


def test_xsum_bad_rows_counted_and_prompt(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"id": "1", "document": "A long article.", "summary": "Short."},
            {"id": "2", "document": "", "summary": "x"}, {"id": "3", "document": "Text", "summary": " "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, report = data.load_xsum(path)
    assert len(kept) == 1 and sum(report.bad.values()) == 2
    example = TASKS["xsum"].examples(kept, "</s>")[0]
    assert example["prompt"] == "Article: A long article.\n\nSummarize the above article in one sentence.\nSummary: "
    assert example["completion"] == "Short.</s>"


def test_dialogsum_examples_prompt_ends_at_output():
    rows, _ = data.load_dialogsum(require_data("dialogsum"), "train")
    examples = TASKS["dialogsum"].examples(rows[:3], "<eos>")
    assert all(e["prompt"].endswith("Output:\n") and e["completion"].endswith("<eos>") for e in examples)


def test_completion_only_labels_keep_eos():
    """trl tokenization of our rows: prompt masked out, the completion and its EOS trained."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from phisum.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    rows = TASKS["dialogsum"].examples([{"dialogue": "#Person1#: Hi.", "summaries": ["A greeting."]}],
                                       tokenizer.eos_token)
    trainer = SFTTrainer(model=build_tiny_model(), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         args=SFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none"))
    row = trainer.train_dataset[0]
    prompt_len = len(tokenizer(rows[0]["prompt"])["input_ids"])
    labels = [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])] \
        if "completion_mask" in row else row["labels"]
    assert all(label == -100 for label in labels[:prompt_len])
    trained = [t for t in labels if t != -100]
    assert tokenizer.decode(trained) == "A greeting." + tokenizer.eos_token
    assert trained[-1] == tokenizer.eos_token_id and trained.count(tokenizer.eos_token_id) == 1
