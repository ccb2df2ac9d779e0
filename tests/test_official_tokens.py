"""Token ids and prompt strings equal the official code's (transformers 4.31) for every prompt the model sees.

Golden data: tests/fixtures/tokenizer_golden (made by hand with make_golden.py in a transformers 4.31 side
environment, from the official Osprey code itself): eval and demo prompts, stage 1/2/3 samples through the official
dataset classes, the server's chat prompts, and text right after added tokens, each tokenized with five tokenizer
folders (SentencePiece only, Vicuna's config with `legacy: false`, the folder the official trainer saves, that
folder without tokenizer.json, and one whose special tokens are stored as normalized).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from osprey.data.records import parse_record
from osprey.data.samples import DETAILED_QUESTIONS, build_sample
from osprey.prompts import OVERVIEW_PREFIX, task_prompt
from osprey.tokenization import build_example, encode_generation_prompt, load_tokenizer, tokenize_prompt
from serve.chat import ChatConversation, bind_regions

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "tokenizer_golden"
GOLDEN = json.loads((GOLDEN_DIR / "golden.json").read_text())
CASES = GOLDEN["cases"]


@pytest.fixture(scope="module", params=GOLDEN["variants"])
def tokenizer_of(request):
    return request.param, load_tokenizer(GOLDEN_DIR / "folders" / request.param)


def _our_ids(tokenizer, case: dict) -> list[int]:
    """The one tokenization path the server, eval and training use, on the official messages."""
    if case.get("raw"):
        return tokenize_prompt(tokenizer, case["text"])[0]
    messages = [tuple(m) for m in case["messages"]]
    if case["generation"]:
        return encode_generation_prompt(tokenizer, messages, num_image_tokens=1, template=case["template"])
    return build_example(tokenizer, messages, num_image_tokens=1, template=case["template"]).input_ids


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_equal_the_official_ids(tokenizer_of, name):
    variant, tokenizer = tokenizer_of
    expected = CASES[name]["ids"][variant]
    ours = _our_ids(tokenizer, CASES[name])
    if ours != expected:
        at = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
        show = lambda ids: tokenizer.convert_ids_to_tokens([i for i in ids[max(at - 3, 0):at + 4] if i >= 0])
        pytest.fail(f"{name} with {variant}: first difference at token {at}: ours {show(ours)}, official {show(expected)}")


def test_pieces_after_added_tokens_follow_the_legacy_rule(tokenizer_of):
    """The behaviour that differs from transformers 5's own Llama tokenizer: "▁" is prepended after `<pos>`."""
    _, tokenizer = tokenizer_of
    ids, _ = tokenize_prompt(tokenizer, "<mask><pos> a")
    assert tokenizer.convert_ids_to_tokens(ids)[1:] == ["<mask>", "<pos>", "▁", "▁a"]


# -- the strings our builders make are the official ones ---------------------------------------------------------
def _messages(name: str) -> tuple[tuple[str, str], ...]:
    return tuple((role, text) for role, text in CASES[name]["messages"])


@pytest.mark.parametrize("name, task", [("eval_category", "category"), ("eval_open_vocab", "open_vocab"),
                                        ("eval_refcocog", "refcocog"), ("demo_short", "short"),
                                        ("demo_detailed", "detailed")])
def test_task_prompts_are_the_official_eval_and_demo_prompts(name, task):
    assert (("human", task_prompt(task)),) == _messages(name)


@pytest.mark.parametrize("kind", ["conversations", "short_form", "parts", "pos_neg"])
def test_stage3_samples_are_the_official_ones(kind):
    case = CASES[f"stage3_{kind}"]
    sample = build_sample(case["record"], 3, kind, "/images", np.random.default_rng(0))
    assert sample.messages == _messages(f"stage3_{kind}")


def test_stage3_detailed_sample_is_the_official_one_given_its_questions():
    """The official loader draws each question with `random.choice`: pick the seed that draws the same ones."""
    official = _messages("stage3_detailed")
    asked = (official[0][1].removeprefix(OVERVIEW_PREFIX), official[2][1])
    wanted = [DETAILED_QUESTIONS.index(question.replace("<mask><pos>", "<region>")) for question in asked]

    def draws(seed: int) -> list[int]:  # as the builder draws: one question per region, in turn
        rng = np.random.default_rng(seed)
        return [int(rng.integers(len(DETAILED_QUESTIONS))) for _ in wanted]

    seed = next(s for s in range(20_000) if draws(s) == wanted)
    sample = build_sample(CASES["stage3_detailed"]["record"], 3, "detailed", "/images", np.random.default_rng(seed))
    assert sample.messages == official


@pytest.mark.parametrize("name", ["stage2_categories", "stage2_referring"])
def test_stage2_samples_are_the_official_ones(name):
    """Same regions and labels as the official COCO / RefCOCO loaders saw; the order is the official draw."""
    case = CASES[name]
    official = _messages(name)
    order = [case["labels"].index(text) for role, text in official if role == "gpt"]
    record = {**CASES["stage3_short_form"]["record"], "conversations": None,
              "description": [f"<region{k + 1}>: {label}" for k, label in enumerate(case["labels"])]}
    if name == "stage2_referring":
        record["annotation"] = record["annotation"][:1]
    seed = next(s for s in range(1000) if list(np.random.default_rng(s).permutation(len(case["labels"]))) == order)
    sample = build_sample(parse_record(record), 2, case["kind"], "/images", np.random.default_rng(seed))
    assert sample.messages == official


def test_stage1_sample_is_the_official_one():
    record = {**CASES["stage3_short_form"]["record"], "annotation": [],
              "conversations": [{"from": "human", "value": "Describe the image briefly.\n<image>"},
                                {"from": "gpt", "value": "A dog and a red car on a lawn."}]}
    assert build_sample(record, 1, "captions", "/images", np.random.default_rng(0)).messages == _messages(
        "stage1_caption")


@pytest.mark.parametrize("name, turns, regions, order", [
    ("chat_implicit_1", [("human", "Describe the masked region.")], 1, [0]),
    ("chat_implicit_3", [("human", "How are they related?")], 3, [0, 1, 2]),
    ("chat_inline_multiturn", [("human", "What is <region1> doing?"), ("gpt", "It is sitting on the grass."),
                               ("human", "Is <region3> bigger than <region2>?")], 3, [0, 2, 1]),
])
def test_server_chat_prompts_are_the_official_strings(name, turns, regions, order):
    conv = ChatConversation(turns=list(turns))
    bind_regions(conv, regions)
    assert tuple(conv.turns) == _messages(name)
    assert conv.region_order == order  # <regionK> binds mask K wherever it is named
