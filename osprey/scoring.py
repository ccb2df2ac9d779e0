"""Scoring given answers by the model's own likelihood, no generation: label lists per region (classification with
probabilities) and yes/no questions (a calibrated match score for text queries).

    scorer = AnswerScorer(pipe)
    scores = scorer.classify(pipe.encode_image(image), masks, ["circle", "square", "x"])   # masks: (Q, H, W) bool
    scores.probabilities       # (Q, L), each row sums to 1

Every (region, answer) pair is one row of one batched pass through the engine's forward (osprey.engine.forward):
the image's shared prefix (system prompt, image tokens, text before the region) is prefilled once; each region's
own prompt tokens (`<mask><pos>? ... ASSISTANT:`) run once as a row; then every answer of every region is a row
whose suffix starts with a copy of its region's keys and values, so an answer costs only its own tokens. The
logits at the region's last token give each answer's first token; the answer rows give the rest.

An answer's score is the mean log-probability per token of the tokens that training gave such an answer turn
(`osprey.tokenization.encode_answers`: the answer and its `</s>`, so "red" is not rewarded for being the start of
"red circle"). The mean, not the sum, so a label of four tokens does not lose to one of one token just for its
length (the length-normalised score of the issue; the sum would be the proper sequence probability). The
probabilities are the softmax of those means over the given list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from osprey.engine.forward import LlamaForward, RowBlock
from osprey.engine.kv import KVPool, PoolSize, token_bytes
from osprey.generation import SamplingParams
from osprey.inference import EncodedImage, OspreyPipeline
from osprey.prompts import YES_NO_ANSWERS, query_question, task_prompt
from osprey.tokenization import encode_answers

__all__ = ["AnswerScorer", "LabelScores", "QueryScores"]

_ONE_TOKEN = SamplingParams(max_new_tokens=1)  # group_requests wants sampling settings; scoring never samples


@dataclass(frozen=True)
class LabelScores:
    labels: tuple[str, ...]
    mean_logprob: np.ndarray  # (Q, L) mean log-probability per answer token (the score)
    probabilities: np.ndarray  # (Q, L) softmax of mean_logprob over the labels: rows sum to 1
    answer_tokens: np.ndarray  # (L,) tokens scored per label (its tokens and </s>)

    def top(self, region: int, k: int) -> list[tuple[str, float]]:
        """The k most probable labels of one region, most probable first."""
        order = np.argsort(-self.probabilities[region], kind="stable")[:k]
        return [(self.labels[i], float(self.probabilities[region, i])) for i in order]


@dataclass(frozen=True)
class QueryScores:
    text: str
    scores: np.ndarray  # (Q,) P(yes): the probability that each region is `text`


@dataclass(frozen=True)
class _AnswerRows:
    """The answer rows of one pass, sorted by length: region and answer index, tokens to score (>= 1)."""

    region: list[int]
    answer: list[int]
    tokens: list[list[int]]


class AnswerScorer:
    def __init__(self, pipe: OspreyPipeline, memory_budget_bytes: int | None = None) -> None:
        """`memory_budget_bytes`: KV and logits memory of one chunk of answer rows (default: half the GPU memory
        left, at most 24 GiB; 1 GiB on CPU). Longer lists run in several chunks over the same prefix."""
        self.pipe = pipe
        self.forward = LlamaForward(pipe.model.language_model)
        self.memory_budget_bytes = memory_budget_bytes

    # -- public ------------------------------------------------------------------------------------------------
    def classify(self, image: EncodedImage, masks: np.ndarray | torch.Tensor, labels: Sequence[str],
                 prompt: str = "category") -> LabelScores:
        """Each region's probability over `labels` under a single-region prompt (a task name or a custom prompt
        with `<region>`; default the official category prompt)."""
        labels = tuple(labels)
        if not labels:
            raise ValueError("the label list is empty")
        mean, counts = self.score_answers(image, masks, [("human", task_prompt(prompt))], labels)
        return LabelScores(labels, mean, _softmax(mean), counts)

    def query(self, image: EncodedImage, masks: np.ndarray | torch.Tensor, text: str) -> QueryScores:
        """P(yes) per region for "Is there a `text` in <region>?": the softmax of the two answers' scores."""
        mean, _ = self.score_answers(image, masks, [("human", query_question(text))], YES_NO_ANSWERS)
        return QueryScores(text, _softmax(mean)[:, 0])

    @torch.inference_mode()
    def score_answers(self, image: EncodedImage, masks: np.ndarray | torch.Tensor,
                      messages: Sequence[tuple[str, str]], answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """messages: one human turn (or a conversation ending with one) naming one region once -> (Q, A) mean
        log-probability per answer token, and (A,) token counts."""
        for index, answer in enumerate(answers):
            if not answer.strip():
                raise ValueError(f"answer {index} is empty")
        pipe = self.pipe
        tokens = encode_answers(pipe.tokenizer, messages, answers, image_token_id=pipe.config.image_token_id)
        prompts = pipe.prepare_each(image, list(messages), masks)
        if not prompts:
            return np.zeros((0, len(answers))), np.array([len(t) for t in tokens])
        (group,) = pipe.group_requests(prompts, [_ONE_TOKEN] * len(prompts))
        suffixes = [row.suffix for row in group.rows]
        totals = self._run(group.prefix, suffixes, tokens)
        counts = np.array([len(t) for t in tokens])
        return totals / counts[None, :], counts

    # -- the pass ----------------------------------------------------------------------------------------------
    def _run(self, prefix: torch.Tensor, region_suffixes: list[torch.Tensor], answers: list[list[int]]) -> np.ndarray:
        """-> (Q, A) summed log-probabilities of every answer's tokens after every region's prompt."""
        regions = len(region_suffixes)
        region_lengths = [s.shape[0] for s in region_suffixes]
        rows = _answer_rows(regions, answers)
        longest = max(len(t) for t in answers) - 1  # the first answer token is read from the region row
        chunk = self._chunk_rows(max(region_lengths) + longest, max(longest, 1), len(rows.region))
        pool = self._pool(prefix.shape[0], regions + chunk, max(region_lengths) + max(longest, 1))
        prefix_length = torch.tensor([prefix.shape[0]], device=self.pipe.device)
        self.forward.prefill_prefix(prefix.to(pool.prefix_k[0]), pool, 0)
        first = self._region_rows(region_suffixes, pool, prefix_length)  # (Q, V) log-probs of the first token
        totals = torch.zeros((regions, len(answers)), dtype=torch.float64)
        for start in range(0, len(rows.region), chunk):
            part = _AnswerRows(rows.region[start:start + chunk], rows.answer[start:start + chunk],
                               rows.tokens[start:start + chunk])
            sums = self._answer_pass(part, first, region_lengths, regions, pool, prefix_length)
            totals[part.region, part.answer] = sums.double().cpu()
        return totals.numpy()

    def _region_rows(self, suffixes: list[torch.Tensor], pool: KVPool, prefix_length: torch.Tensor) -> torch.Tensor:
        """Each region's own prompt tokens as rows 0..Q-1 of the pool -> log-probs (Q, V) after its last token."""
        device = self.pipe.device
        embeds = pad_sequence([s.to(pool.prefix_k[0]) for s in suffixes], batch_first=True)
        lengths = torch.tensor([s.shape[0] for s in suffixes], device=device)
        block = _block(first=0, start=torch.zeros_like(lengths), lengths=lengths, tokens=embeds.shape[1],
                       prefix_keys=int(prefix_length[0]))
        hidden = self.forward.row_hidden(embeds, block, pool, prefix_length)
        last = hidden[torch.arange(len(suffixes), device=device), lengths - 1]
        return torch.log_softmax(self.forward.logits(last), dim=-1)

    def _answer_pass(self, rows: _AnswerRows, first: torch.Tensor, region_lengths: list[int], regions: int,
                     pool: KVPool, prefix_length: torch.Tensor) -> torch.Tensor:
        """Rows `regions ..` of the pool: each starts as a copy of its region row, then runs its answer's tokens
        but the last (the answer's tokens from the second on are read from them) -> (n,) summed log-probs."""
        device = self.pipe.device
        n = len(rows.region)
        targets = [torch.tensor(t, device=device) for t in rows.tokens]
        total = first[rows.region, torch.stack([t[0] for t in targets])]
        inputs = [t[:-1] for t in targets]
        lengths = torch.tensor([len(t) for t in inputs], device=device)
        if int(lengths.max()) == 0:
            return total
        pool.move_rows(list(rows.region), list(range(regions, regions + n)))
        ids = pad_sequence([t if len(t) else t.new_zeros(1) for t in inputs], batch_first=True)
        start = torch.tensor([region_lengths[q] for q in rows.region], device=device)
        block = _block(first=regions, start=start, lengths=lengths.clamp(min=1), tokens=ids.shape[1],
                       prefix_keys=int(prefix_length[0]))
        hidden = self.forward.row_hidden(self.forward.embed(ids), block, pool, prefix_length)
        logprobs = torch.log_softmax(self.forward.logits(hidden), dim=-1)  # (n, T, V)
        later = pad_sequence([t[1:] for t in targets], batch_first=True, padding_value=0)
        picked = logprobs[:, :later.shape[1]].gather(-1, later[..., None])[..., 0]
        real = torch.arange(later.shape[1], device=device)[None, :] < lengths[:, None]
        return total + (picked * real).sum(dim=1)

    # -- memory ------------------------------------------------------------------------------------------------
    def _pool(self, prefix_tokens: int, rows: int, row_tokens: int) -> KVPool:
        lm = self.forward
        weight = self.pipe.model.language_model.get_input_embeddings().weight
        return KVPool(PoolSize(1, prefix_tokens, rows, row_tokens), lm.num_layers, lm.num_kv_heads, lm.head_dim,
                      weight.dtype, weight.device)

    def _chunk_rows(self, row_tokens: int, answer_tokens: int, wanted: int) -> int:
        """Answer rows per pass within the memory budget: each holds its KV copy (`row_tokens`) and, for its
        `answer_tokens` positions, fp32 logits and log-probs and the layer activations."""
        lm = self.pipe.model.language_model
        config = lm.config
        element = lm.get_input_embeddings().weight.element_size()
        kv = token_bytes(self.forward.num_layers, self.forward.num_kv_heads, self.forward.head_dim, lm.dtype)
        per_position = 2 * 4 * config.vocab_size + element * (4 * config.hidden_size + 3 * config.intermediate_size)
        per_row = kv * row_tokens + answer_tokens * per_position
        return max(1, min(wanted, self._budget() // per_row))

    def _budget(self) -> int:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        device = self.pipe.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return min(free // 2, 24 * 2**30)
        return 2**30


def _answer_rows(regions: int, answers: list[list[int]]) -> _AnswerRows:
    """Every (region, answer) pair, longest answers last, so a chunk pads its rows to similar lengths."""
    order = sorted(range(len(answers)), key=lambda a: len(answers[a]))
    pairs = [(q, a) for a in order for q in range(regions)]
    return _AnswerRows([q for q, _ in pairs], [a for _, a in pairs], [answers[a] for _, a in pairs])


def _block(first: int, start: torch.Tensor, lengths: torch.Tensor, tokens: int, prefix_keys: int) -> RowBlock:
    """Rows `first ..` of one image (prefix slot 0), each with its own suffix from `start`."""
    n = lengths.shape[0]
    device = lengths.device
    return RowBlock(first=first, count=n, tokens=tokens, start=start, lengths=lengths,
                    group=torch.zeros(n, dtype=torch.long, device=device), local=torch.arange(n, device=device),
                    group_first=0, groups=1, width=n, prefix_keys=prefix_keys,
                    suffix_keys=int(start.max()) + tokens)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)
