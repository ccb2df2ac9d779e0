"""OpenAI chat messages -> an Osprey conversation: turns, the image, and which region each `<mask><pos>` binds.

`<regionK>` (1-based) in any turn becomes `<mask><pos>` bound to region K; a region mentioned twice appears
twice (masks bind to `<mask>` occurrences in text order, across all turns). The official data binds the i-th
`<mask>` to the i-th annotation instead; the two agree whenever regions are mentioned in order, and ours lets a
client name any region anywhere. The first turn opens as the official stage-3 samples do: when no turn mentions
a region, all of them are introduced ("<image>\nThis provides an overview of the picture.\nTher are N part
regions in the picture: region1<mask><pos>,region2<mask><pos>. " + question), so DAM-style clients ("describe
the masked region") work unchanged; otherwise the overview line precedes the question, as in the positive/negative
samples. Regions not mentioned are left out of the prompt (multi-turn clients send every region on every turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from osprey.prompts import (
    IMAGE_PLACEHOLDER,
    MASK_TOKEN,
    POS_TOKEN,
    REGION_PLACEHOLDER,
    inline_region_question,
    multi_region_question,
)

from .errors import bad_request
from .schemas import ChatMessage, ImagePart

REGION_TAG = re.compile(r"<region(\d+)>")
_RESERVED = (IMAGE_PLACEHOLDER, MASK_TOKEN, POS_TOKEN)


@dataclass
class ImageRef:
    url: str
    param: str  # where it was in the request, for error messages


@dataclass
class ChatConversation:
    """turns: alternating ("human" | "gpt", text), first and last human; region_order: region index per
    `<mask><pos>` in text order; images: the image first, then mask images (DAM convention)."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    region_order: list[int] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    system: str | None = None
    chars: int = 0


def parse_messages(messages: list[ChatMessage]) -> ChatConversation:
    """Split roles, collect images, merge consecutive same-role messages; region tags are kept for bind_regions."""
    conv = ChatConversation()
    systems: list[str] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        text = _message_text(message, param, conv)
        conv.chars += len(text)
        for token in _RESERVED:
            if token in text:
                raise bad_request(f"message text may not contain the reserved token {token!r}; refer to regions "
                                  "as <region1>, <region2>, ... and send the image as an image_url part",
                                  f"{param}.content", "reserved_token")
        if message.role in ("system", "developer"):
            systems.append(text)
            continue
        role = "human" if message.role == "user" else "gpt"
        if not conv.turns and role == "gpt":
            raise bad_request("the conversation must start with a user message", f"{param}.role")
        if conv.turns and conv.turns[-1][0] == role:
            conv.turns[-1] = (role, conv.turns[-1][1] + "\n" + text)
        else:
            conv.turns.append((role, text))
    if not conv.turns:
        raise bad_request("messages contain no user message", "messages")
    if conv.turns[-1][0] != "human":
        raise bad_request("the last message must be from the user (assistant prefill is not supported)",
                          f"messages[{len(messages) - 1}].role")
    if not conv.images:
        raise bad_request("no image: send the image as an image_url content part (base64 data URL)", "messages",
                          "missing_image")
    conv.system = "\n".join(systems) if systems else None
    return conv


def _message_text(message: ChatMessage, param: str, conv: ChatConversation) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            if message.role != "user":
                raise bad_request("images are only accepted in user messages", f"{param}.content[{j}]")
            conv.images.append(ImageRef(part.image_url.url, f"{param}.content[{j}].image_url.url"))
        else:
            texts.append(part.text)
    return "\n".join(texts)


def bind_regions(conv: ChatConversation, num_regions: int) -> None:
    """Replace `<regionK>` tags with `<mask><pos>`, record the binding, and open the first turn with `<image>` and
    the region introduction of the official stage-3 data (osprey.prompts)."""
    mentioned: set[int] = set()
    turns: list[tuple[str, str]] = []
    for role, text in conv.turns:
        def substitute(match: re.Match[str]) -> str:
            k = int(match.group(1))
            if not 1 <= k <= num_regions:
                have = f"regions <region1>..<region{num_regions}>" if num_regions else "no regions"
                raise bad_request(f"<region{k}> is referenced but the request has {have}", "messages",
                                  "unknown_region")
            conv.region_order.append(k - 1)
            mentioned.add(k - 1)
            return REGION_PLACEHOLDER

        turns.append((role, REGION_TAG.sub(substitute, text)))
    if num_regions and not mentioned:
        first = multi_region_question(num_regions, turns[0][1])
        conv.region_order[:0] = list(range(num_regions))
    else:  # regions not mentioned (yet: a client sends all of them on every turn) are not in the prompt
        first = inline_region_question(turns[0][1])
    turns[0] = ("human", first)
    conv.turns = turns
