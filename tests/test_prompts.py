"""Template and prompt strings exactly as the official release writes them (spec section 6)."""

import pytest

from osprey.prompts import (
    TASK_PROMPTS,
    TEMPLATES,
    clean_answer,
    inline_region_question,
    multi_region_prefix,
    multi_region_question,
    task_prompt,
)

TRAIN_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
INFER_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


def test_system_prompts():
    assert TEMPLATES["train"].system == TRAIN_SYSTEM
    assert TEMPLATES["infer"].system == INFER_SYSTEM


def test_vicuna_v1_rendering_multi_turn_and_generation_prompt():
    text = TEMPLATES["train"].render([("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", None)])
    assert text == TRAIN_SYSTEM + " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        TEMPLATES["train"].render([("gpt", "a"), ("human", "q")])
    with pytest.raises(ValueError, match="unknown role"):
        TEMPLATES["train"].render([("system", "x")])


def test_official_inference_prompts():
    assert task_prompt("category") == (
        "<image>\nThis provides an overview of the picture.\nWhat is the category of <mask><pos>? "
        "Using only one word or phrase."
    )
    assert task_prompt("open_vocab") == (
        "<image>\n.\nThis provides an overview of the picture.\nWhat is in <mask><pos>? Using a short phrase."
    )
    assert task_prompt("refcocog") == (
        "<image>\n.\nThis provides an overview of the picture.\nPlease give me a short description of <mask><pos>."
    )
    assert task_prompt("short") == (
        "<image>\n\nThis provides an overview of the picture.\nPlease give me a short description of <mask><pos>. "
        "Using a short phrase."
    )
    assert task_prompt("detailed") == (
        "<image>\n\nThis provides an overview of the picture.\nCan you give me a detailed description of <mask><pos>?"
    )
    assert set(TASK_PROMPTS) == {"category", "open_vocab", "refcocog", "short", "detailed"}


def test_custom_prompt_and_unknown_task():
    assert task_prompt("What colour is <region>?") == (
        "<image>\nThis provides an overview of the picture.\nWhat colour is <mask><pos>?"
    )
    with pytest.raises(ValueError, match="unknown task"):
        task_prompt("describe it")


def test_multi_region_prefix_keeps_official_typo_and_singular():
    assert multi_region_prefix(1) == (
        "<image>\nThis provides an overview of the picture.\nTher are 1 part region in the picture: region1<mask><pos>."
    )
    assert multi_region_prefix(2).endswith("Ther are 2 part regions in the picture: region1<mask><pos>,region2<mask><pos>.")
    with pytest.raises(ValueError, match="num_regions=0"):
        multi_region_prefix(0)


def test_region_introductions_are_the_spec_strings_byte_for_byte():
    # spec section 6: `<image>\nThis provides an overview of the picture.\n` + `Ther are N part regions in the
    # picture: region1<mask><pos>,region2<mask><pos>. ` + question (the official loader joins them with ". ")
    assert multi_region_question(2, "What is region1?") == (
        "<image>\nThis provides an overview of the picture.\n"
        "Ther are 2 part regions in the picture: region1<mask><pos>,region2<mask><pos>. What is region1?")
    assert inline_region_question("Is <mask><pos> a dog?") == (
        "<image>\nThis provides an overview of the picture.\nIs <mask><pos> a dog?")


@pytest.mark.parametrize(
    "raw, clean",
    [(" a dog</s>", "a dog"), ("Region: a red car", "a red car"), ("plain", "plain"), ("a: b: c", "b: c")],
)
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean
