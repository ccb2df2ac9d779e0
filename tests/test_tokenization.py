"""Special tokens, LLaVA chunk-wise `<image>` tokenization and training labels."""

import pytest

from osprey.prompts import TEMPLATES, task_prompt
from osprey.tokenization import (
    IGNORE_INDEX,
    build_example,
    encode_generation_prompt,
    expand_image_placeholder,
    load_tokenizer,
    special_token_ids,
    tokenize_prompt,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_mask_and_pos_are_single_tokens_past_the_vocabulary(tokenizer):
    assert special_token_ids(tokenizer) == (512, 513)
    ids = tokenizer("of <mask><pos>.", add_special_tokens=False)["input_ids"]
    assert ids.count(512) == 1 and ids.count(513) == 1 and ids.index(513) == ids.index(512) + 1
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_chunkwise_image_tokenization_keeps_only_the_first_bos(tokenizer):
    text = "A chat. USER: <image>\nWhat is <mask><pos>? ASSISTANT:"
    ids, spans = tokenize_prompt(tokenizer, text)
    first = tokenizer("A chat. USER: ")["input_ids"]
    second = tokenizer("\nWhat is <mask><pos>? ASSISTANT:")["input_ids"]
    assert ids == first + [-200] + second[1:]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert text[spans[len(first)][0]:spans[len(first)][1]] == "<image>"
    assert len(spans) == len(ids)


def test_expand_image_placeholder():
    assert expand_image_placeholder([1, -200, 5], -200, 3) == [1, -200, -200, -200, 5]


def test_labels_train_exactly_the_answers_and_their_eos(tokenizer):
    messages = [("human", task_prompt("short")), ("gpt", "a red circle"), ("human", "and <mask><pos>?"), ("gpt", "a blue star")]
    ex = build_example(tokenizer, messages, num_image_tokens=64)
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ex.input_ids, ex.labels))
    assert tokenizer.decode(trained) == " a red circle</s> a blue star</s>"
    assert ex.input_ids.count(-200) == 64 and ex.num_regions == 2
    assert not ex.truncated and not ex.fully_masked
    # the full text tokenizes to the same ids as the official chunk-wise rendering
    ids, _ = tokenize_prompt(tokenizer, TEMPLATES["train"].render(messages))
    assert ex.input_ids == expand_image_placeholder(ids, -200, 64)


def test_truncation_never_splits_a_region_and_flags_fully_masked(tokenizer):
    messages = [("human", "<image>\nlook at <mask><pos> please"), ("gpt", "a long answer " * 20)]
    full = build_example(tokenizer, messages, num_image_tokens=8)
    mask_at = full.input_ids.index(512)
    cut = build_example(tokenizer, messages, num_image_tokens=8, max_length=mask_at + 1)
    assert cut.truncated and cut.num_regions == 0 and 512 not in cut.input_ids and cut.fully_masked
    kept = build_example(tokenizer, messages, num_image_tokens=8, max_length=mask_at + 2)
    assert kept.num_regions == 1 and kept.input_ids[-1] == 513
    with pytest.raises(ValueError, match="cuts into the 8 image tokens"):
        build_example(tokenizer, messages, num_image_tokens=8, max_length=5)


def test_generation_prompt_ends_with_assistant(tokenizer):
    ids = encode_generation_prompt(tokenizer, [("human", task_prompt("category"))], num_image_tokens=4)
    text_ids = [t for t in ids if t >= 0]
    assert tokenizer.decode(text_ids).endswith("ASSISTANT:")
    assert ids.count(-200) == 4
    with pytest.raises(ValueError, match="end with a human turn"):
        encode_generation_prompt(tokenizer, [("human", "q"), ("gpt", "a")], num_image_tokens=4)
