"""Tokenizer handling: `<mask>`/`<pos>` as added tokens, LLaVA's chunk-wise `<image>` tokenization, and training
examples whose labels train exactly the assistant answers (plus their `</s>`).

Labels come from character offsets, not from the official per-round length arithmetic, so no tokenizer can
cause the "tokenization mismatch" that silently zeroes a sample's loss; a fully masked sample (e.g. every answer
truncated away) is still flagged on the example.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from osprey.prompts import IMAGE_PLACEHOLDER, MASK_TOKEN, POS_TOKEN, TEMPLATES

IGNORE_INDEX = -100


def trained_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) bool: which next-token targets train (position t predicts labels[:, t + 1])."""
    return labels[:, 1:] != IGNORE_INDEX


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a (fast) tokenizer from a local folder and check that `<mask>`/`<pos>` are single added tokens."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our config.json has model_type "osprey", which AutoConfig doesn't know
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [t for t in (MASK_TOKEN, POS_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        # Official folders carry added_tokens.json; add the tokens without resizing anything (ids past the vocab).
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # official: pad = unk (id 0)
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(mask_id, pos_id) of a tokenizer."""
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN), tokenizer.convert_tokens_to_ids(POS_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Llama's conventions (BOS prepended, `<unk>`=0, `<s>`=1, `</s>`=2), then add
    `<mask>` = vocab_size and `<pos>` = vocab_size + 1 outside the base vocabulary, as in the official tokenizer.

    Used for the tiny test preset and the project's built-in model (no Llama tokenizer exists offline).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus only supports {tok.get_vocab_size()} tokens, fewer than vocab_size={vocab_size}: "
            "give more text or a smaller vocabulary"
        )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        model_max_length=4096,
    )
    fast.add_tokens([MASK_TOKEN, POS_TOKEN], special_tokens=True)
    return fast


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, image_token_id: int = -200
) -> tuple[list[int], list[tuple[int, int]]]:
    """LLaVA's `tokenizer_image_token`: split on `<image>`, tokenize each chunk, keep only the first chunk's BOS,
    put one `image_token_id` between chunks. Also returns each token's character span in `text`."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    bos = tokenizer.bos_token_id
    for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            ids.append(image_token_id)
            spans.append((start - len(IMAGE_PLACEHOLDER), start))
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, chunk_spans = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if index > 0 and chunk_ids and chunk_ids[0] == bos:
            chunk_ids, chunk_spans = chunk_ids[1:], chunk_spans[1:]
        ids.extend(chunk_ids)
        spans.extend((start + a, start + b) for a, b in chunk_spans)
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, spans


def expand_image_placeholder(ids: Sequence[int], image_token_id: int, num_image_tokens: int) -> list[int]:
    """Each image placeholder id becomes `num_image_tokens` slots, so the model never changes sequence length."""
    out: list[int] = []
    for token in ids:
        out.extend([token] * num_image_tokens if token == image_token_id else [token])
    return out


@dataclass
class Example:
    input_ids: list[int]  # placeholders expanded
    labels: list[int]  # IGNORE_INDEX except answer tokens and their </s>
    num_regions: int  # <mask> tokens kept (after truncation): bind the first num_regions masks
    truncated: bool
    fully_masked: bool  # no token is trained: the sample contributes no loss


def build_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    *,
    num_image_tokens: int,
    image_token_id: int = -200,
    template: str = "train",
    max_length: int | None = None,
) -> Example:
    """A training example from alternating (role, text) messages that end with an answer.

    Text: the template's rendering (Vicuna v1). Trained tokens: those overlapping an answer, its `</s>`, or the
    space between `ASSISTANT:` and the answer. Generation prompts end at `ASSISTANT:` (`encode_generation_prompt`),
    so the model must produce that space itself: a Llama tokenizer folds it into the answer's first token
    ("▁Yes"), but a small byte-level BPE may keep it as a lone "Ġ" token, which must be trained too (left out, the
    built-in model learned only the first tokens that do carry the space, and answered every yes/no question
    with a description).
    Truncation to `max_length` never splits a `<mask><pos>` pair.
    """
    conv = TEMPLATES[template]
    text = conv.render(messages)
    # Character spans of answers + their separator, located while re-rendering round by round.
    trained: list[tuple[int, int]] = []
    cursor = len(conv.system + conv.sep)
    for index, (role, message) in enumerate(messages):
        head = f"{conv.roles[index % 2]}: "
        sep = conv.sep if index % 2 == 0 else conv.sep2
        body_start = cursor + len(head)
        body_end = body_start + len(message) + len(sep)
        if index % 2 == 1:
            trained.append((body_start - 1, body_end))  # from the space that ends `head`
        cursor = body_end
    assert cursor == len(text), "template rendering and span walk disagree"

    ids, spans = tokenize_prompt(tokenizer, text, image_token_id)
    labels = [
        token if any(a < e and b > s for s, e in trained) and b > a and token != image_token_id else IGNORE_INDEX
        for token, (a, b) in zip(ids, spans)
    ]
    expanded_ids: list[int] = []
    expanded_labels: list[int] = []
    for token, label in zip(ids, labels):
        count = num_image_tokens if token == image_token_id else 1
        expanded_ids.extend([token] * count)
        expanded_labels.extend([label] * count)

    mask_id, _ = special_token_ids(tokenizer)
    truncated = max_length is not None and len(expanded_ids) > max_length
    if truncated:
        cut = max_length
        if cut > 0 and expanded_ids[cut - 1] == mask_id:  # don't keep a <mask> without its <pos>
            cut -= 1
        if image_token_id in expanded_ids[cut:]:
            raise ValueError(f"max_length={max_length} cuts into the {num_image_tokens} image tokens; raise it")
        expanded_ids, expanded_labels = expanded_ids[:cut], expanded_labels[:cut]
    return Example(
        input_ids=expanded_ids,
        labels=expanded_labels,
        num_regions=sum(1 for t in expanded_ids if t == mask_id),
        truncated=truncated,
        fully_masked=all(label == IGNORE_INDEX for label in expanded_labels),
    )


def encode_generation_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    *,
    num_image_tokens: int,
    image_token_id: int = -200,
    template: str = "infer",
) -> list[int]:
    """Ids of a prompt that ends with `ASSISTANT:` (messages end with a human turn), placeholders expanded."""
    conv = TEMPLATES[template]
    if len(messages) % 2 != 1:
        raise ValueError("a generation prompt needs messages that end with a human turn")
    text = conv.render([*messages, ("gpt", None)])
    ids, _ = tokenize_prompt(tokenizer, text, image_token_id)
    return expand_image_placeholder(ids, image_token_id, num_image_tokens)
