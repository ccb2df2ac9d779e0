"""Scoring given answers by the model's own likelihood, no generation: label lists per region (classification with
probabilities) and text queries (the query's probability in a label list against a background vocabulary).

    scorer = AnswerScorer(pipe)
    scores = scorer.classify(pipe.encode_image(image), masks, ["circle", "square", "x"])   # masks: (Q, H, W) bool
    scores.probabilities       # (Q, L), each row sums to 1

Every (region, answer) pair is one row of one batched pass through the engine's forward (osprey.engine.forward):
the image's shared prefix (system prompt, image tokens, text before the region) is prefilled once; each region's
own prompt tokens (`<mask><pos>? ... ASSISTANT:`) run once as a row; then every answer of every region is a row
that reads its region row's stored keys in place (`osprey.engine.forward.ParentRows`), so an answer costs only
its own tokens, in compute and in memory; only real tokens run (no padding to the longest answer). The logits at
the region row's last token give each answer's first token; the answer rows give the rest. Several
questions about the same regions (queries for several texts) share the pass the same way: their common start is
the prefix, and each (question, region) is a prompt row.

An answer's score is the mean log-probability per token of the tokens that training gave such an answer turn
(`osprey.tokenization.encode_answers`: the answer and its `</s>`, so "red" is not rewarded for being the start of
"red circle"). The mean, not the sum, so a label of four tokens does not lose to one of one token just for its
length (the length-normalised score of the issue; the sum would be the proper sequence probability). The
probabilities are the softmax of those means over the given list.

A text query's score is the text's probability in the label list [text] + background vocabulary (by default the
model folder's `vocabulary.txt`). On the generated val split it is calibrated (ECE 0.009) and counts 97.5 % of
(image, category) pairs exactly, where P(yes) to the positive/negative question form counts 78 % (the built-in
model says yes to single-turn questions about almost anything; ECE 0.25). bench/query_eval.py measures both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from osprey.engine.forward import LlamaForward, ParentRows, RowBlock
from osprey.engine.kv import KVPool, PoolSize, token_bytes
from osprey.inference import EncodedImage, OspreyPipeline
from osprey.prompts import YES_NO_ANSWERS, query_question, task_prompt
from osprey.tokenization import encode_answers

__all__ = ["DEFAULT_QUERY_THRESHOLD", "VOCABULARY_FILE", "AnswerScorer", "LabelScores", "QueryScores",
           "default_vocabulary"]

# A region matches a query when its score reaches this: the threshold with the most exactly right counts on the val
# split of the generated dataset with the built-in model (40 images, 560 image-category pairs; bench/query_eval.py,
# docs/classify.md). Other models may want their own (the request's `threshold`).
DEFAULT_QUERY_THRESHOLD = 0.29
VOCABULARY_FILE = "vocabulary.txt"  # a model folder's default background labels for queries, one per line


def default_vocabulary(model_dir: str | Path) -> list[str] | None:
    """The background labels a model folder ships for queries (`vocabulary.txt`), or None."""
    path = Path(model_dir) / VOCABULARY_FILE
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    scores: np.ndarray  # (Q,) the probability that each region is `text`

    def matches(self, threshold: float = DEFAULT_QUERY_THRESHOLD) -> np.ndarray:
        """(Q,) bool: the regions whose score reaches `threshold`; their sum is the count."""
        return self.scores >= threshold


@dataclass(frozen=True)
class _AnswerRows:
    """The answer rows of one pass, sorted by length: the prompt row each extends (a question about a region), the
    answer's index, and its tokens to score (>= 1)."""

    prompt: list[int]
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

    def query(self, image: EncodedImage, masks: np.ndarray | torch.Tensor, text: str, vocabulary: Sequence[str]
              ) -> QueryScores:
        """P(region is `text`) per region: the probability of `text` in the label list `text` + `vocabulary` (the
        background: what else a region may be; `text` is left out of it where it is there too)."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("the query text is empty")
        background = list(dict.fromkeys(v.strip() for v in vocabulary if v.strip() and v.strip() != text))
        if not background:
            raise ValueError("the background vocabulary is empty: give the labels a region may be besides the text")
        return QueryScores(text, self.classify(image, masks, [text, *background]).probabilities[:, 0])

    def yes_probabilities(self, image: EncodedImage, masks: np.ndarray | torch.Tensor, texts: Sequence[str]
                          ) -> list[QueryScores]:
        """Per text, P(yes) per region to "Is there a `text` in <region>?" (the softmax of the two answers' scores),
        all texts in one pass. The other query score, measured against `query` in bench/query_eval.py."""
        questions = [[("human", query_question(text))] for text in texts]
        mean, _ = self.score_questions(image, masks, questions, YES_NO_ANSWERS)
        return [QueryScores(" ".join(text.split()), _softmax(scores)[:, 0]) for text, scores in zip(texts, mean)]

    def score_answers(self, image: EncodedImage, masks: np.ndarray | torch.Tensor,
                      messages: Sequence[tuple[str, str]], answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """messages: one human turn (or a conversation ending with one) naming one region once -> (Q, A) mean
        log-probability per answer token, and (A,) token counts."""
        mean, counts = self.score_questions(image, masks, [messages], answers)
        return mean[0], counts

    @torch.inference_mode()
    def score_questions(self, image: EncodedImage, masks: np.ndarray | torch.Tensor,
                        questions: Sequence[Sequence[tuple[str, str]]], answers: Sequence[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """`score_answers` for several single-region questions at once -> (T, Q, A) and (A,) token counts; the
        ids the questions share (system prompt, image, their common start) are prefilled once."""
        for index, answer in enumerate(answers):
            if not answer.strip():
                raise ValueError(f"answer {index} is empty")
        pipe = self.pipe
        tokens = [encode_answers(pipe.tokenizer, messages, answers, image_token_id=pipe.config.image_token_id)
                  for messages in questions]
        if any(t != tokens[0] for t in tokens[1:]):
            raise ValueError("the answers tokenize differently after these questions; score them one at a time")
        counts = np.array([len(t) for t in tokens[0]])
        prompts = [prompt for messages in questions for prompt in pipe.prepare_each(image, list(messages), masks)]
        if not prompts:
            return np.zeros((len(questions), 0, len(answers))), counts
        prefix, suffixes = pipe.split_shared_prefix(prompts)
        totals = self._run(prefix, suffixes, tokens[0])
        return (totals / counts[None, :]).reshape(len(questions), -1, len(answers)), counts

    # -- the pass ----------------------------------------------------------------------------------------------
    def _run(self, prefix: torch.Tensor, prompt_suffixes: list[torch.Tensor], answers: list[list[int]]) -> np.ndarray:
        """prefix (P, D), each prompt's rest (t_i, D) -> (prompts, A) summed log-probabilities of every answer's
        tokens after every prompt."""
        prompts = len(prompt_suffixes)
        prompt_lengths = [s.shape[0] for s in prompt_suffixes]
        rows = _answer_rows(prompts, answers)
        pool = self._pool(prefix.shape[0], prompts, max(prompt_lengths))
        prefix_length = torch.tensor([prefix.shape[0]], device=self.pipe.device)
        self.forward.prefill_prefixes([prefix.to(pool.prefix_k[0])], pool, [0])
        first = self._prompt_rows(prompt_suffixes, pool, prefix_length)  # (prompts, V): first answer token
        totals = torch.zeros((prompts, len(answers)), dtype=torch.float64)
        longest = max(len(t) for t in answers) - 1  # tokens an answer row runs: the first is read from its prompt
        chunk = self._chunk_rows(max(longest, 1), len(rows.prompt))
        answer_pool = pool.with_rows(chunk, max(longest, 1))
        used = torch.tensor(prompt_lengths, device=self.pipe.device)
        for part in _passes(rows, chunk):
            sums = self._answer_pass(part, first, (pool, used), answer_pool, prefix_length)
            totals[part.prompt, part.answer] = sums.double().cpu()
        return totals.numpy()

    def _prompt_rows(self, suffixes: list[torch.Tensor], pool: KVPool, prefix_length: torch.Tensor) -> torch.Tensor:
        """Each prompt's own tokens (its region's, question's) as rows 0.. of the pool -> log-probs (rows, V) of the
        token after its last."""
        device = self.pipe.device
        embeds = pad_sequence([s.to(pool.prefix_k[0]) for s in suffixes], batch_first=True)
        lengths = torch.tensor([s.shape[0] for s in suffixes], device=device)
        block = _block(start=torch.zeros_like(lengths), lengths=lengths, tokens=embeds.shape[1],
                       prefix_keys=int(prefix_length[0]))
        return torch.log_softmax(self.forward.forward_rows(embeds, block, pool, prefix_length), dim=-1)

    def _answer_pass(self, rows: _AnswerRows, first: torch.Tensor, prompts: tuple[KVPool, torch.Tensor],
                     pool: KVPool, prefix_length: torch.Tensor) -> torch.Tensor:
        """Rows 0.. of `pool`, each reading its prompt row (`prompts`: their pool and lengths) then running its
        answer's tokens but the last (the answer's tokens from the second on are read from them) -> (n,) summed
        log-probs."""
        device = self.pipe.device
        prompt = torch.tensor(rows.prompt, device=device)
        total = first[prompt, torch.tensor([t[0] for t in rows.tokens], device=device)]
        inputs = [t[:-1] for t in rows.tokens]
        if not any(inputs):  # one-token answers: the prompt rows gave them
            return total
        lengths = torch.tensor([len(t) for t in inputs], device=device)
        ids = pad_sequence([torch.tensor(t) for t in inputs], batch_first=True).to(device)
        block = _block(start=torch.zeros_like(lengths), lengths=lengths, tokens=ids.shape[1],
                       prefix_keys=int(prefix_length[0]), parent=_parents(*prompts, prompt))
        hidden = self.forward.row_hidden(self.forward.embed(ids), block, pool, prefix_length)  # (N, D)
        logprobs = torch.log_softmax(self.forward.logits(hidden), dim=-1)  # (N, V)
        later = torch.tensor([token for t in rows.tokens for token in t[1:]], device=device)
        picked = logprobs.gather(-1, later[:, None])[:, 0]
        row_of = torch.arange(len(inputs), device=device).repeat_interleave(lengths)
        return total.index_add(0, row_of, picked)

    # -- memory ------------------------------------------------------------------------------------------------
    def _pool(self, prefix_tokens: int, rows: int, row_tokens: int) -> KVPool:
        lm = self.forward
        weight = self.pipe.model.language_model.get_input_embeddings().weight
        return KVPool(PoolSize(1, prefix_tokens, rows, row_tokens), lm.num_layers, lm.num_kv_heads, lm.head_dim,
                      weight.dtype, weight.device)

    def _chunk_rows(self, answer_tokens: int, wanted: int) -> int:
        """Answer rows per pass within the memory budget: each holds its own tokens' keys and values and, for
        each of them, fp32 logits and log-probs and the layer activations (bounded by the longest answer)."""
        lm = self.pipe.model.language_model
        config = lm.config
        element = lm.get_input_embeddings().weight.element_size()
        kv = token_bytes(self.forward.num_layers, self.forward.num_kv_heads, self.forward.head_dim, lm.dtype)
        per_position = 2 * 4 * config.vocab_size + element * (4 * config.hidden_size + 3 * config.intermediate_size)
        return max(1, min(wanted, self._budget() // (answer_tokens * (kv + per_position))))

    def _budget(self) -> int:
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        device = self.pipe.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return min(free // 2, 24 * 2**30)
        return 2**30


def _answer_rows(prompts: int, answers: list[list[int]]) -> _AnswerRows:
    """Every (prompt row, answer) pair, shortest answers first, so one-token answers come first."""
    order = sorted(range(len(answers)), key=lambda a: len(answers[a]))
    pairs = [(q, a) for a in order for q in range(prompts)]
    return _AnswerRows([q for q, _ in pairs], [a for _, a in pairs], [answers[a] for _, a in pairs])


def _passes(rows: _AnswerRows, most: int) -> Iterator[_AnswerRows]:
    """The (length-sorted) rows in the fewest passes of at most `most` rows, of equal size; rows of one-token
    answers run no pass (their token is read from the prompt row), they come as a pass of their own. Padding costs
    nothing (only real tokens run), so where the passes are cut does not matter; their number does (each reads
    the weights once: on one H100, 16 regions x 100 labels took 1.03 s in 12 passes, 0.64 s in 2)."""
    free = sum(1 for tokens in rows.tokens if len(tokens) == 1)
    rest = len(rows.tokens) - free
    passes = -(-rest // most)
    cuts = [0, free, *(free + rest * k // passes for k in range(1, passes + 1))]
    for start, end in itertools.pairwise(cuts):
        if end > start:
            yield _AnswerRows(rows.prompt[start:end], rows.answer[start:end], rows.tokens[start:end])


def _block(start: torch.Tensor, lengths: torch.Tensor, tokens: int, prefix_keys: int,
           parent: ParentRows | None = None) -> RowBlock:
    """Rows 0.. of one image (prefix slot 0), each with its own suffix from `start`."""
    n = lengths.shape[0]
    device = lengths.device
    return RowBlock(first=0, count=n, tokens=tokens, start=start, lengths=lengths,
                    group=torch.zeros(n, dtype=torch.long, device=device), local=torch.arange(n, device=device),
                    group_first=0, groups=1, width=n, prefix_keys=prefix_keys,
                    suffix_keys=int(start.max()) + tokens, parent=parent)


def _parents(prompts: KVPool, lengths: torch.Tensor, slot: torch.Tensor) -> ParentRows:
    """The prompt rows of `prompts` (rows 0.., `lengths` tokens each) as the parents of answer rows (`slot`)."""
    return ParentRows(prompts.suffix_k, prompts.suffix_v, slot=slot, used=lengths)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)
