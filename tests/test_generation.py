import pytest

from phisum.generation import Generation, GenerationSettings, InputError, first_stop, held_back, validate_text


@pytest.mark.parametrize("bad, match", [
    ("", "empty"), ("   \n\t ", "empty"), (None, "must be text"), (b"#Person1#: hi", "not bytes"),
    (42, "must be text"), ("abc\x00def", "binary"), ("".join(chr(i % 31 + 1) for i in range(400)), "binary"),
])
def test_validate_text_rejects_with_a_clear_message(bad, match):
    with pytest.raises(InputError, match=match):
        validate_text(bad)


def test_validate_text_keeps_real_text():
    assert validate_text("  #Person1#: Grüße, ça va?\n\t#Person2#: 好 ") == "#Person1#: Grüße, ça va?\n\t#Person2#: 好"


def test_stop_helpers():
    stops = ("### Human:", "\nInstruct:")
    assert first_stop("a\nInstruct: b ### Human: c", stops) == 1
    assert first_stop("no stop here", stops) == -1
    assert held_back("reply ### Hu", stops) == len("### Hu")
    assert held_back("reply\n", stops) == 1
    assert held_back("reply.", stops) == 0


def test_settings_validation():
    GenerationSettings(max_new_tokens=64).validate(2048)
    with pytest.raises(InputError, match="max new tokens"):
        GenerationSettings(max_new_tokens=0).validate(2048)
    with pytest.raises(InputError, match="max new tokens"):
        GenerationSettings(max_new_tokens=2000).validate(2048)
    with pytest.raises(InputError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0).validate(2048)
    with pytest.raises(InputError, match="seed"):
        GenerationSettings(seed=2**70).validate(2048)
    with pytest.raises(InputError, match="lone surrogate"):
        validate_text("half \ud800 surrogate")
    greedy = GenerationSettings().generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None


def test_empty_output_is_reported_not_blank():
    g = Generation(text="  ", system="base", prompt_tokens=3, new_tokens=0, finish_reason="eos")
    assert g.empty and "empty output" in g.display
