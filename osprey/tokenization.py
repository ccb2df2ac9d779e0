"""Tokenizer handling: `<mask>`/`<pos>` as added tokens, LLaVA's chunk-wise `<image>` tokenization, and training
examples whose labels train exactly the assistant answers (plus their `</s>`).

Labels come from character offsets, not from the official per-round length arithmetic, so no tokenizer can
cause the "tokenization mismatch" that silently zeroes a sample's loss; a fully masked sample (e.g. every answer
truncated away) is still flagged on the example.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from osprey.prompts import IMAGE_PLACEHOLDER, MASK_TOKEN, POS_TOKEN, TEMPLATES

IGNORE_INDEX = -100


def trained_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) bool: which next-token targets train (position t predicts labels[:, t + 1])."""
    return labels[:, 1:] != IGNORE_INDEX


# -- loading: the tokenizer the official code used ------------------------------------------------------------------
# The official code loads its tokenizer with `AutoTokenizer(..., use_fast=True)` under transformers 4.31, and the
# released model was trained on those ids. For a Llama SentencePiece folder that tokenizer is the `tokenizers`
# pipeline of 4.31's `LlamaConverter` (or the folder's own tokenizer.json, used verbatim): a normalizer that
# prepends "▁" to *every* piece of text between added tokens ("<pos> a" -> "<pos>", "▁", "▁a"; "</s>USER" ->
# "</s>", "▁USER"), with no pre-tokenizer. 4.31's fast tokenizer ignores `legacy` in tokenizer_config.json (only
# its slow tokenizer read it). Transformers 5 rebuilds Llama tokenizers with a Metaspace pre-tokenizer that drops
# that "▁" (and reads `legacy`), so we build the backend ourselves and wrap it, never going through AutoTokenizer.
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a model folder, giving the ids transformers 4.31 gave the official code for the same files.

    Files, in 4.31's order of preference: tokenizer.json (used as it is), else tokenizer.model (SentencePiece,
    converted as 4.31's `LlamaConverter` did); tokenizer_config.json / special_tokens_map.json name the special
    tokens; added_tokens.json ids are checked. `<mask>`/`<pos>` end up as special tokens matched in the raw text,
    as after the official `add_tokens(["<mask>", "<pos>"], special_tokens=True)`; pad = unk as in the official code.
    """
    folder = Path(path)
    settings = _tokenizer_settings(folder)
    is_llama = settings.get("tokenizer_class") in LLAMA_TOKENIZER_CLASSES or not (folder / "tokenizer.json").is_file()
    if (folder / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").is_file():
        backend = sentencepiece_to_tokenizers(folder / "tokenizer.model")
    else:
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor tokenizer.model: is it a model folder?")
    specials = {key: _token_text(settings[key]) for key in _SPECIAL_KEYS if settings.get(key) is not None}
    extra = {}
    if is_llama:  # 4.31's LlamaTokenizerFast rebuilt the post-processor from these two flags (BOS on, EOS off)
        extra = {"add_bos_token": settings.get("add_bos_token", True), "add_eos_token": settings.get("add_eos_token", False)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=settings.get("model_max_length", 4096), **specials, **extra
    )
    _add_listed_tokens(tokenizer, folder)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (MASK_TOKEN, POS_TOKEN)],
                         special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # official: pad = unk (id 0)
    return tokenizer


def _tokenizer_settings(folder: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (4.31 applied the map after the config)."""
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text()))
    return settings


def _token_text(value: str | dict) -> str:
    """Special tokens are saved as strings or, by 4.31, as `{"__type": "AddedToken", "content": ...}`."""
    return value["content"] if isinstance(value, dict) else value


def _add_listed_tokens(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """added_tokens.json: add what the backend lacks, in id order, and check every id (a wrong id would shift
    `<mask>`/`<pos>` away from the ids the checkpoint's config names)."""
    listed_file = folder / "added_tokens.json"
    if not listed_file.is_file():
        return
    listed: dict[str, int] = json.loads(listed_file.read_text())
    for token, index in sorted(listed.items(), key=lambda item: item[1]):
        if token not in tokenizer.get_vocab():
            special = token in tokenizer.all_special_tokens or token in (MASK_TOKEN, POS_TOKEN)
            tokenizer.add_tokens([AddedToken(token, special=special, normalized=not special)], special_tokens=special)
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise ValueError(f"{listed_file} gives {token!r} id {index} but the tokenizer files give it "
                             f"{tokenizer.convert_tokens_to_ids(token)}")


def sentencepiece_to_tokenizers(model_file: str | Path) -> Tokenizer:
    """A Llama SentencePiece BPE file -> the `tokenizers` pipeline transformers 4.31's `LlamaConverter` built.

    Merges: every split of a piece into two pieces, ordered by the piece's score (highest first), ties by the
    ids of the two halves, as 4.31's `SentencePieceExtractor` ordered them (transformers 5 orders them otherwise).
    """
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != 2:  # 1 = unigram, 2 = BPE
        raise ValueError(f"{model_file} is a SentencePiece model of type {proto.trainer_spec.model_type}; Llama "
                         "tokenizers are BPE (type 2)")
    # 4.31 names the first three pieces itself and gives them score 0.
    scores = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab = {piece: index for index, (piece, _) in enumerate(scores)}
    merges = []
    for merged, score in dict(scores).items():
        halves = [(merged[:i], merged[i:]) for i in range(1, len(merged)) if merged[:i] in vocab and merged[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(halves, key=lambda h: (vocab[h[0]], vocab[h[1]]))]
    merges.sort(key=lambda merge: merge[2], reverse=True)  # stable: ties keep the order above
    tokenizer = Tokenizer(models.BPE(vocab, [(left, right) for left, right, _ in merges],
                                     unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken("<unk>"), AddedToken("<s>"), AddedToken("</s>")])
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(mask_id, pos_id) of a tokenizer."""
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN), tokenizer.convert_tokens_to_ids(POS_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Llama's conventions (BOS prepended, `<unk>`=0, `<s>`=1, `</s>`=2), then add
    `<mask>` = vocab_size and `<pos>` = vocab_size + 1 outside the base vocabulary, as in the official tokenizer.

    Used for the tiny test preset and the project's built-in model (no Llama tokenizer exists offline).
    """
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


def encode_answers(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    answers: Sequence[str],
    *,
    image_token_id: int = -200,
    template: str = "infer",
) -> list[list[int]]:
    """Per answer, the ids that follow the generation prompt of `messages` (`encode_generation_prompt`) when the
    conversation goes on with that answer and its `</s>`: the tokens training saw for such a turn, which are what
    a likelihood score must read (osprey.scoring).

    Only the text after the last `<image>` differs between the prompt and a conversation with an answer, so only
    that chunk is tokenized, once for all answers. Raises ValueError naming an answer that would change the
    prompt's own tokens (its first characters merging with `ASSISTANT:`).
    """
    conv = TEMPLATES[template]
    if len(messages) % 2 != 1:
        raise ValueError("answers follow messages that end with a human turn")
    prompt_text = conv.render([*messages, ("gpt", None)])
    texts = [conv.render([*messages, ("gpt", answer)]) for answer in answers]
    has_image = IMAGE_PLACEHOLDER in prompt_text

    def tail(text: str) -> str:  # the last chunk tokenize_prompt would tokenize
        return text.rsplit(IMAGE_PLACEHOLDER, 1)[-1]

    encoded = tokenizer([tail(prompt_text)] + [tail(text) for text in texts])["input_ids"]
    if has_image:  # chunks after an <image> lose their BOS, as in tokenize_prompt
        encoded = [ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids for ids in encoded]
    prompt_ids, out = list(encoded[0]), []
    for answer, ids in zip(answers, encoded[1:]):
        if list(ids[:len(prompt_ids)]) != prompt_ids:
            raise ValueError(f"the answer {answer!r} changes how the prompt before it is tokenized; it cannot be "
                             "scored as a continuation of that prompt")
        out.append(list(ids[len(prompt_ids):]))
    return out
