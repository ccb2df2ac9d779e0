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


@pytest.mark.parametrize("source", ["tiny", "builtin"])
def test_each_answer_is_trained_from_the_token_that_follows_the_generation_prompt(tiny_model_dir, source):
    """Train/serve agreement: for every answer, the ids before its first trained token are exactly the generation
    prompt of the conversation so far (`encode_generation_prompt`, which ends at `ASSISTANT:`), and the token
    after that prompt is trained. With the built-in byte-level BPE "Yes" follows a lone-space token; before this
    was trained, the model never learned to emit it and answered yes/no questions with descriptions."""
    from pathlib import Path

    import osprey

    folder = tiny_model_dir if source == "tiny" else Path(osprey.__file__).parent / "assets" / "builtin"
    tok = load_tokenizer(folder)
    messages = [("human", "<image>\nThis provides an overview of the picture.\nIs there a diamond in <mask><pos>?"),
                ("gpt", "Yes"), ("human", "Is <mask><pos> yellow?"), ("gpt", "No"),
                ("human", "What is the category of <mask><pos>?"), ("gpt", "square"),
                ("human", "Describe <mask><pos>."), ("gpt", "This is a small red circle.")]
    for template in ("train", "infer"):
        ex = build_example(tok, messages, num_image_tokens=4, template=template)
        trained = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
        starts = [i for i in trained if i - 1 not in trained]
        assert len(starts) == 4  # one contiguous trained run per answer (answer + </s>)
        for turn, start in enumerate(starts):
            prompt = encode_generation_prompt(tok, messages[: 2 * turn + 1], num_image_tokens=4, template=template)
            assert ex.input_ids[:start] == prompt, (source, template, turn)
