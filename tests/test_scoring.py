"""osprey.scoring: label-list and yes/no scores by likelihood, against a plain transformers forward."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.prompts import YES_NO_ANSWERS, query_question, task_prompt
from osprey.scoring import AnswerScorer, _AnswerRows, _passes
from osprey.tokenization import encode_answers, encode_generation_prompt

FIXTURE_SYNTH = Path(__file__).parent / "fixtures" / "synth"

LABELS = ["circle", "red square", "x", "a much longer label with many words", "ellipse"]


def _image_and_masks(height: int = 48, width: int = 64, regions: int = 3) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    masks = np.zeros((regions, height, width), bool)
    for q in range(regions):
        masks[q, 4 * q:20 + 6 * q, 3 + 5 * q:30 + 7 * q] = True
    return image, masks


@torch.no_grad()
def _reference_logprobs(pipe, encoded, masks, messages, answers) -> np.ndarray:
    """(Q, A) summed log-probs of each answer's tokens: transformers' own forward over the whole sequence
    (prompt + answer + </s>), one region and one answer at a time."""
    config = pipe.config
    prompt = encode_generation_prompt(pipe.tokenizer, messages, num_image_tokens=config.vision.num_image_tokens,
                                      image_token_id=config.image_token_id)
    answer_ids = encode_answers(pipe.tokenizer, messages, answers, image_token_id=config.image_token_id)
    mask_tokens, pos_tokens = pipe.region_tokens(encoded, masks)
    out = np.zeros((masks.shape[0], len(answers)))
    for q in range(masks.shape[0]):
        for a, answer in enumerate(answer_ids):
            ids = torch.tensor(prompt + answer)[None]
            embeds = pipe.model.merge_embeddings(ids, encoded.tokens[None], mask_tokens[q:q + 1], pos_tokens[q:q + 1])
            logits = pipe.model.language_model(inputs_embeds=embeds).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            out[q, a] = float(logprobs[positions, torch.tensor(answer)].sum())
    return out


def test_scores_equal_a_plain_transformers_forward(tiny_pipeline):
    pipe = tiny_pipeline
    image, masks = _image_and_masks()
    encoded = pipe.encode_image(image)
    messages = [("human", task_prompt("category"))]
    mean, counts = AnswerScorer(pipe).score_answers(encoded, masks, messages, LABELS)
    reference = _reference_logprobs(pipe, encoded, masks, messages, LABELS)
    assert len(set(counts.tolist())) > 1  # labels of different token lengths in one pass
    np.testing.assert_allclose(mean, reference / counts[None, :], rtol=0, atol=1e-5)  # the scores
    np.testing.assert_allclose(mean * counts[None, :], reference, rtol=1e-6, atol=0)  # the sums (fp32 sums of ~20)


def test_chunked_pass_equals_one_pass(tiny_pipeline):
    """A budget of one answer row per pass gives the same scores as all rows at once."""
    pipe = tiny_pipeline
    image, masks = _image_and_masks()
    encoded = pipe.encode_image(image)
    messages = [("human", task_prompt("category"))]
    whole, _ = AnswerScorer(pipe).score_answers(encoded, masks, messages, LABELS)
    scorer = AnswerScorer(pipe, memory_budget_bytes=1)
    assert scorer._chunk_rows(4, 100) == 1
    chunked, _ = scorer.score_answers(encoded, masks, messages, LABELS)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)


def test_answer_passes_are_fewest_and_even():
    """No pass exceeds `most` rows, there are no more than the fewest, one-token answers come as a pass of their
    own, and every row is in exactly one pass, in order."""
    rng = random.Random(0)
    for _ in range(300):
        lengths = sorted(rng.randint(1, 6) for _ in range(rng.randint(1, 30)))
        most = rng.randint(1, 12)
        rows = _AnswerRows(prompt=list(range(len(lengths))), answer=[0] * len(lengths),
                           tokens=[[7] * length for length in lengths])
        parts = list(_passes(rows, most))
        assert [q for part in parts for q in part.prompt] == rows.prompt
        sizes = [len(part.prompt) for part in parts]
        free = lengths.count(1)
        assert all(0 < size <= most for size in sizes[1 if free else 0:])
        assert len(parts) == (1 if free else 0) + -(-(len(lengths) - free) // most)
        if free:
            assert all(len(t) == 1 for t in parts[0].tokens) and sizes[0] == free
        rest = sizes[1:] if free else sizes
        assert not rest or max(rest) - min(rest) <= 1


def test_one_token_answers_run_no_pass():
    rows = _AnswerRows(prompt=[0, 1, 0, 1, 0], answer=[0, 0, 1, 1, 2], tokens=[[5], [5], [6, 2], [6, 2], [7, 8, 2]])
    parts = list(_passes(rows, most=4))
    assert [p.tokens for p in parts] == [[[5], [5]], [[6, 2], [6, 2], [7, 8, 2]]]


def test_probabilities_sum_to_one_and_follow_the_labels(tiny_pipeline):
    pipe = tiny_pipeline
    image, masks = _image_and_masks()
    encoded = pipe.encode_image(image)
    scorer = AnswerScorer(pipe)
    scores = scorer.classify(encoded, masks, LABELS)
    assert scores.probabilities.shape == (3, len(LABELS))
    np.testing.assert_allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-9)
    order = [3, 0, 4, 2, 1]
    shuffled = scorer.classify(encoded, masks, [LABELS[i] for i in order])
    np.testing.assert_allclose(shuffled.probabilities, scores.probabilities[:, order], atol=1e-6)
    top = scores.top(0, 2)
    assert top[0][1] >= top[1][1] and top[0][0] == LABELS[int(np.argmax(scores.probabilities[0]))]


def test_query_is_the_text_probability_against_the_vocabulary(tiny_pipeline):
    pipe = tiny_pipeline
    image, masks = _image_and_masks(regions=2)
    encoded = pipe.encode_image(image)
    scorer = AnswerScorer(pipe)
    query = scorer.query(encoded, masks, " circle ", ["square", "circle", "x", "square"])
    listed = scorer.classify(encoded, masks, ["circle", "square", "x"])
    assert query.text == "circle"
    np.testing.assert_allclose(query.scores, listed.probabilities[:, 0], atol=1e-9)
    np.testing.assert_array_equal(query.matches(0.0), [True, True])
    with pytest.raises(ValueError, match="background vocabulary is empty"):
        scorer.query(encoded, masks, "circle", ["circle", " "])


def test_yes_probability_is_the_softmax_of_the_two_answers(tiny_pipeline):
    pipe = tiny_pipeline
    image, masks = _image_and_masks(regions=2)
    encoded = pipe.encode_image(image)
    scorer = AnswerScorer(pipe)
    several = scorer.yes_probabilities(encoded, masks, ["square", "circle", "red star"])  # one pass, prefix shared
    for text, scores in zip(["square", "circle", "red star"], several):
        mean, _ = scorer.score_answers(encoded, masks, [("human", query_question(text))], YES_NO_ANSWERS)
        np.testing.assert_allclose(scores.scores, np.exp(mean[:, 0]) / np.exp(mean).sum(axis=1), atol=1e-6)
    assert query_question("x").endswith("Is there an x in <mask><pos>?")
    assert "Is there an ellipse in" in query_question("  ellipse ")


def test_bad_answers_raise(tiny_pipeline):
    pipe = tiny_pipeline
    image, masks = _image_and_masks(regions=1)
    encoded = pipe.encode_image(image)
    scorer = AnswerScorer(pipe)
    with pytest.raises(ValueError, match="empty"):
        scorer.classify(encoded, masks, [])
    with pytest.raises(ValueError, match="answer 1 is empty"):
        scorer.classify(encoded, masks, ["circle", "  "])
    with pytest.raises(ValueError, match="empty"):
        query_question("   ")


@pytest.mark.slow
def test_builtin_model_names_its_regions_by_likelihood(builtin_pipeline):
    """The trained model puts most probability on the right category of generated test regions."""
    from osprey.data.records import iter_records, record_masks
    from osprey.data.samples import region_descriptions

    pipe = builtin_pipeline
    scorer = AnswerScorer(pipe)
    labels = ["circle", "ellipse", "square", "triangle", "diamond", "star", "ring", "frame", "cross", "x",
              "house", "flower", "robot", "tree"]
    right = total = 0
    for _, record in iter_records(FIXTURE_SYNTH / "test" / "stage2_categories.json"):
        scores = scorer.classify(pipe.encode_image(FIXTURE_SYNTH / record.file_name), record_masks(record), labels)
        for k, label in region_descriptions(record):
            right += labels[int(np.argmax(scores.probabilities[k - 1]))] == label
            total += 1
    # 13 of 17 when written: the fixture's images are 128 px, half the size the model was trained on (the held-out
    # 256 px test split: 97 %, docs/classify.md); a model that ignored its regions would name ~1 in 14
    assert total >= 5 and right / total >= 0.7


def test_classify_speed_benchmark_runs_on_cpu(tmp_path, tiny_model_dir):
    """bench/classify_speed.py (the GPU figure's script) on a tiny model folder (`--preset tiny` builds the same
    shapes, after training a tokenizer): a JSON report with the timings."""
    import json

    from bench.classify_speed import main

    out = tmp_path / "speed.json"
    report = main(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--regions", "2", "--labels", "5", "--repeats", "1",
                   "--image-size", "64", "--profile", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert "aten::" in report["profile"]
    assert report["rows"] == 10 and report["probabilities_sum_to_one"] and report["seconds"] > 0
    assert report["seconds_scoring_only"] <= report["seconds"] * 5


@pytest.mark.gpu
def test_scores_on_cuda_in_bf16_equal_the_dense_path_and_the_fp32_reference(tiny_model_dir, monkeypatch):
    """The packed kernels (FlashAttention over only the real tokens, answer rows reading their question row in
    place) against the dense path on the same GPU and dtype, and against fp32 on the CPU."""
    from osprey.engine import forward as engine_forward
    from osprey.inference import OspreyPipeline

    image, masks = _image_and_masks()
    labels = [*LABELS, "a", "square with a circle in it"]

    def scores(device: str, dtype: torch.dtype) -> np.ndarray:
        pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device=device, dtype=dtype)
        return AnswerScorer(pipe).classify(pipe.encode_image(image), masks, labels).mean_logprob

    reference = scores("cpu", torch.float32)
    packed = scores("cuda", torch.bfloat16)
    monkeypatch.setattr(engine_forward, "packed_kernel_runs", lambda tensor: False)
    dense = scores("cuda", torch.bfloat16)
    np.testing.assert_allclose(packed, dense, rtol=0, atol=3e-2)
    np.testing.assert_allclose(packed, reference, rtol=0, atol=6e-2)
