"""Conversation templates, the official inference prompts, and answer clean-up (spec section 6).

Templates are data; one renderer serves all of them. Every string here is part of checkpoint
compatibility: change nothing without checking the spec.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

IMAGE_PLACEHOLDER = "<image>"
MASK_TOKEN = "<mask>"
POS_TOKEN = "<pos>"
REGION_PLACEHOLDER = MASK_TOKEN + POS_TOKEN  # one region in the text, bound to masks in order


@dataclass(frozen=True)
class ConversationTemplate:
    """Vicuna v1 ("SeparatorStyle.TWO"): `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def render(self, messages: Iterable[tuple[str, str | None]]) -> str:
        """messages: (role index 0/1 or "human"/"gpt", text); text None = generation prompt (`ASSISTANT:`)."""
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, (role, text) in enumerate(messages):
            role_index = _role_index(role)
            if role_index != i % 2:
                raise ValueError(f"message {i} has role {role!r}; roles must alternate starting with the human")
            name = self.roles[role_index]
            out += f"{name}: {text}{seps[role_index]}" if text is not None else f"{name}:"
        return out

    @property
    def answer_prefix(self) -> str:
        """What precedes every assistant answer in the rendered text (masked from the loss)."""
        return self.sep + self.roles[1] + ": "


def _role_index(role: str | int) -> int:
    if role in (0, "human", "user", "USER"):
        return 0
    if role in (1, "gpt", "assistant", "ASSISTANT"):
        return 1
    raise ValueError(f"unknown role {role!r} (expected 'human' or 'gpt')")


_TRAIN_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_INFER_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ConversationTemplate] = {
    "train": ConversationTemplate("train", _TRAIN_SYSTEM),
    "infer": ConversationTemplate("infer", _INFER_SYSTEM),
}

# Official single-region inference prompts (user message, before the template). `{region}` is one region.
TaskName = Literal["category", "open_vocab", "refcocog", "short", "detailed"]
TASK_PROMPTS: dict[str, str] = {
    "category": "<image>\nThis provides an overview of the picture.\nWhat is the category of {region}? Using only one word or phrase.",
    "open_vocab": "<image>\n.\nThis provides an overview of the picture.\nWhat is in {region}? Using a short phrase.",
    "refcocog": "<image>\n.\nThis provides an overview of the picture.\nPlease give me a short description of {region}.",
    "short": "<image>\n\nThis provides an overview of the picture.\nPlease give me a short description of {region}. Using a short phrase.",
    "detailed": "<image>\n\nThis provides an overview of the picture.\nCan you give me a detailed description of {region}?",
}
CUSTOM_REGION_TAG = "<region>"  # custom prompts name their one region with this tag
# The line every stage-3 sample and eval prompt has after the image (the demo and some evals add "\n" or ".\n").
OVERVIEW_PREFIX = "<image>\nThis provides an overview of the picture.\n"
CUSTOM_PREFIX = OVERVIEW_PREFIX


def task_prompt(task: str) -> str:
    """The user message for a task name, or for a custom prompt that contains `<region>` once or more."""
    if task in TASK_PROMPTS:
        return TASK_PROMPTS[task].format(region=REGION_PLACEHOLDER)
    if CUSTOM_REGION_TAG not in task:
        raise ValueError(
            f"unknown task {task!r}: use one of {sorted(TASK_PROMPTS)} or a custom prompt containing '<region>'"
        )
    body = task.replace(CUSTOM_REGION_TAG, REGION_PLACEHOLDER)
    return body if body.startswith(IMAGE_PLACEHOLDER) else CUSTOM_PREFIX + body


def multi_region_prefix(num_regions: int) -> str:
    """The stage-3 opening that lists all regions, verbatim from the official data (typo "Ther" included), up to
    its final "."; `multi_region_question` is the whole first turn."""
    if num_regions < 1:
        raise ValueError(f"a multi-region prompt needs at least one region, got num_regions={num_regions}")
    noun = "part region" if num_regions == 1 else "part regions"
    listed = ",".join(f"region{i + 1}{REGION_PLACEHOLDER}" for i in range(num_regions))
    return f"{OVERVIEW_PREFIX}Ther are {num_regions} {noun} in the picture: {listed}."


def multi_region_question(num_regions: int, question: str) -> str:
    """First human turn of the official multi-region samples (conversations, short-form, parts): the overview line,
    every region listed as `regionK<mask><pos>` (the K-th `<mask>` binds region K), ". ", then the question, which
    names regions as plain `regionK`:
    `<image>\nThis provides an overview of the picture.\nTher are 2 part regions in the picture:
    region1<mask><pos>,region2<mask><pos>. What is region1?`"""
    return f"{multi_region_prefix(num_regions)} {question}"


def inline_region_question(question: str) -> str:
    """First human turn of the official samples that name regions inline (positive/negative, detailed
    descriptions): the overview line, then the question with each region as `<mask><pos>` where it is named."""
    return OVERVIEW_PREFIX + question


# A yes/no question about one region, in the inline form of the positive/negative samples (spec section 6, the
# official `OspreyLVISPosNeg` loader; our generated dataset's `stage3_pos_neg` asks "Is there a circle in <region1>?").
QUERY_QUESTION = "Is there {article} {text} in {region}?"
YES_NO_ANSWERS = ("Yes", "No")


def query_question(text: str) -> str:
    """The single-region yes/no question asking whether the region is `text`, overview line first."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("the query text is empty")
    first_word = text.split()[0].lower()
    # "an" before a vowel, and before a letter said with one ("an x", as the generated data writes it)
    article = "an" if first_word[0] in "aeiou" or (len(first_word) == 1 and first_word in "fhlmnrsx") else "a"
    return inline_region_question(QUERY_QUESTION.format(article=article, text=text, region=REGION_PLACEHOLDER))


def clean_answer(text: str) -> str:
    """Official eval clean-up: strip, drop a trailing `</s>`, keep what follows the first ':' if any."""
    text = text.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    if ":" in text:
        text = text.split(":", 1)[1].strip()
    return text
