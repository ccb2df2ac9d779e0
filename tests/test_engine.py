"""The region engine against independent references: transformers' own generate, plain attention, and itself
under every batching shape (groups, rows joining mid-flight, releases, prefix overflow)."""

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.engine.attention import attend, length_bias, merge
from osprey.engine.core import GroupRequest, RegionDecoder, RowRequest, TokenEvent
from osprey.engine.kv import KVPool, PoolSize, plan_pool, token_bytes
from osprey.engine.sampling import _uniform, sample
from osprey.engine.session import StreamEvent
from osprey.engine.text import TextStream
from osprey.inference import SamplingParams
from osprey.prompts import task_prompt


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def masks():
    m = np.zeros((5, 40, 56), bool)
    m[0, 2:20, 3:30] = True
    m[1, 20:, :] = True
    m[2, 7, 9] = True  # one pixel
    m[3, :, 40:] = True
    return m  # m[4] empty


def _reference_tokens(pipe, prompt, new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' `generate` on the full spliced prompt (no engine code involved)."""
    lm = pipe.model.language_model
    embeds = pipe.model.merge_embeddings(prompt.input_ids[None], prompt.image.tokens[None], prompt.mask_tokens,
                                         prompt.pos_tokens)
    with torch.inference_mode():
        out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=pipe.eos_token_id, pad_token_id=0)
    tokens = out[0].tolist()
    return tokens[:tokens.index(pipe.eos_token_id)] if pipe.eos_token_id in tokens else tokens


def _engine_tokens(pipe, prompts, params) -> list[list[int]]:
    tokens = [[] for _ in prompts]
    for events in pipe.generate_stream(prompts, params):
        for e in events:
            if e.token_id is not None:
                tokens[e.row].append(e.token_id)
    return tokens


def test_greedy_tokens_equal_transformers_generate(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    prompts = [tiny_pipeline.prepare(enc, [("human", task_prompt("short"))], masks[q:q + 1]) for q in range(5)]
    prompts.append(tiny_pipeline.prepare(enc, [("human", task_prompt("category")), ("gpt", "a thing"),
                                               ("human", "and <mask><pos> next to <mask><pos>?")], masks[:3]))
    ours = _engine_tokens(tiny_pipeline, prompts, SamplingParams(max_new_tokens=12))
    reference = [_reference_tokens(tiny_pipeline, p, 12) for p in prompts]
    assert ours == reference
    assert len({tuple(t) for t in ours}) > 1  # the regions do not all get one answer


def _decoder_rows(pipe, enc, masks, new_tokens):
    prompts = [pipe.prepare(enc, [("human", task_prompt("short"))], masks[q:q + 1]) for q in range(len(masks))]
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(prompts)
    return pipe.group_requests(prompts, params), [_reference_tokens(pipe, p, new_tokens) for p in prompts]


def _one_image_added(pipe, image, masks, new_tokens: int, size: PoolSize):
    """A decoder with a pool of `size` holding one image's regions as one waiting group, and their reference tokens."""
    (group,), reference = _decoder_rows(pipe, pipe.encode_image(image), masks, new_tokens)
    decoder = pipe.decoder(size)
    decoder.add(group)
    return decoder, reference


def _run(decoder, until_empty=True):
    tokens = {}
    while decoder.has_work:
        for e in decoder.step():
            tokens.setdefault(e.row_id, [])
            if e.token is not None:
                tokens[e.row_id].append(e.token)
    return tokens


def test_rows_joining_a_running_batch_and_a_small_pool_keep_the_reference_tokens(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    (group,), reference = _decoder_rows(tiny_pipeline, enc, masks, 10)
    # two prefix slots, three row slots: the five rows run in waves, a second group joins mid-flight
    decoder = tiny_pipeline.decoder(PoolSize(prefix_slots=2, prefix_tokens=2048, row_slots=3, suffix_tokens=64))
    decoder.add(GroupRequest(group.prefix, group.rows[:2]))
    tokens = {}
    for _ in range(3):
        for e in decoder.step():
            tokens.setdefault(e.row_id, []).extend([] if e.token is None else [e.token])
    decoder.add(GroupRequest(group.prefix, group.rows[2:]))
    for row_id, more in _run(decoder).items():
        tokens.setdefault(row_id, []).extend(more)
    assert [tokens[i] for i in range(5)] == reference
    assert decoder.live_rows == 0 and not decoder.groups


def _run_checking_slots(decoder, size: PoolSize) -> dict:
    """`_run`, asserting after every step that no more rows or image groups are live than the pool has slots."""
    tokens = {}
    while decoder.has_work:
        for e in decoder.step():
            tokens.setdefault(e.row_id, []).extend([] if e.token is None else [e.token])
        assert decoder.live_rows <= size.row_slots and len(decoder.groups) <= size.prefix_slots
    return tokens


def test_admission_never_exceeds_the_prefix_or_the_row_slots(tiny_pipeline, image, masks):
    """Groups arriving together are admitted only while both their image slot and their rows fit, counting the
    rows already live; the rest wait, and every row still gets the reference tokens."""
    enc = tiny_pipeline.encode_image(image)
    (group,), reference = _decoder_rows(tiny_pipeline, enc, masks[:4], 6)
    rows = group.rows
    # three one-row images at once, two image slots
    images = PoolSize(prefix_slots=2, prefix_tokens=2048, row_slots=5, suffix_tokens=64)
    decoder = tiny_pipeline.decoder(images)
    for row in rows[:3]:
        decoder.add(GroupRequest(group.prefix, [row]))
    tokens = _run_checking_slots(decoder, images)
    assert [tokens[i] for i in range(3)] == reference[:3]
    # one row live, then a two-row and a one-row image at once, three row slots: the second waits
    slots = PoolSize(prefix_slots=3, prefix_tokens=2048, row_slots=3, suffix_tokens=64)
    decoder = tiny_pipeline.decoder(slots)
    decoder.add(GroupRequest(group.prefix, rows[:1]))
    tokens = {e.row_id: [e.token] for e in decoder.step()}
    decoder.add(GroupRequest(group.prefix, rows[1:3]))
    decoder.add(GroupRequest(group.prefix, rows[3:4]))
    for row_id, more in _run_checking_slots(decoder, slots).items():
        tokens.setdefault(row_id, []).extend(more)
    assert [tokens[i] for i in range(4)] == reference


def test_a_row_released_while_its_group_waits_leaves_its_group_mates_to_run(tiny_pipeline, image, masks):
    decoder, reference = _one_image_added(tiny_pipeline, image, masks[:3], 6,
                                          PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=3, suffix_tokens=64))
    decoder.release(1)  # before any step: the group is still waiting
    tokens = _run(decoder)
    assert set(tokens) == {0, 2} and [tokens[0], tokens[2]] == [reference[0], reference[2]]


def test_eos_ends_a_row_with_a_stop_event_that_carries_no_token(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    (group,), reference = _decoder_rows(tiny_pipeline, enc, masks[:1], 6)
    eos = reference[0][3]  # the reference's fourth token plays EOS: the row ends there, before emitting it
    decoder = RegionDecoder(tiny_pipeline.model.language_model, eos,
                            PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=1, suffix_tokens=64))
    decoder.add(group)
    events = []
    while decoder.has_work:
        events += decoder.step()
    first = reference[0].index(eos)
    assert [e.token for e in events[:-1]] == reference[0][:first]
    assert events[-1] == TokenEvent(0, None, True, "stop")


def test_a_group_without_prefix_tokens_is_refused(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    (group,), _ = _decoder_rows(tiny_pipeline, enc, masks[:1], 4)
    decoder = tiny_pipeline.decoder(PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=1, suffix_tokens=64))
    with pytest.raises(ValueError, match="^a group needs at least one prefix token$"):
        decoder.check(GroupRequest(group.prefix[:0], group.rows))


def test_a_prefix_longer_than_the_slots_moves_into_the_rows(tiny_pipeline, image, masks):
    decoder, reference = _one_image_added(tiny_pipeline, image, masks[:3], 8,
                                          PoolSize(prefix_slots=1, prefix_tokens=10, row_slots=3, suffix_tokens=512))
    tokens = _run(decoder)
    assert [tokens[i] for i in range(3)] == reference


def test_released_rows_stop_and_free_their_slots(tiny_pipeline, image, masks):
    decoder, reference = _one_image_added(tiny_pipeline, image, masks[:3], 8,
                                          PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=3, suffix_tokens=64))
    first = decoder.step()
    assert {e.row_id for e in first} == {0, 1, 2} and decoder.live_rows == 3
    decoder.release(1)
    tokens = _run(decoder)
    assert 1 not in tokens and decoder.live_rows == 0
    assert [[first[i].token] + tokens[i] for i in (0, 2)] == [reference[0], reference[2]]


def _session_events(pipe, prompts, params, cancel_after: int | None = None):
    """All events of one session, by row; with `cancel_after`, row 0 is cancelled once it has that many events."""
    session = pipe.session(PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=len(prompts), suffix_tokens=64))
    session.add(pipe.group_requests(prompts, params))
    events: dict[int, list] = {row: [] for row in range(len(prompts))}
    session.finished_at, session.live_per_step = {}, []  # the step that finished each row; live rows after each step
    steps = 0
    while session.has_work:
        if cancel_after is not None and len(events[0]) == cancel_after:
            events[0].append(session.cancel(0))
        for event in session.step():
            events[event.row].append(event)
            if event.finished:
                session.finished_at[event.row] = steps
        session.live_per_step.append(session.live_rows)
        steps += 1
    return session, events


def test_a_session_cuts_stop_strings_frees_the_row_and_streams_the_whole_answer(tiny_pipeline, image, masks):
    """The session's text layer: the streamed deltas of a finished row add up to the full decoded answer (the held-back
    tail included); a stop string inside the greedy answer ends that row at it with reason "stop" and frees its slot
    while the other row runs on."""
    enc = tiny_pipeline.encode_image(image)
    prompts = tiny_pipeline.prepare_each(enc, [("human", task_prompt("short"))], masks[:2])
    plain = SamplingParams(max_new_tokens=10)
    _, free = _session_events(tiny_pipeline, prompts, [plain, plain])
    answer = "".join(e.text_delta for e in free[0])
    tokens = [e.token_id for e in free[0] if e.token_id is not None]
    assert answer == tiny_pipeline.tokenizer.decode(tokens, skip_special_tokens=True) and len(answer) >= 4
    assert free[0][-1].finished and free[0][-1].finish_reason == "length"
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    cut = SamplingParams(max_new_tokens=10, stop=(stop,))
    session, stopped = _session_events(tiny_pipeline, prompts, [cut, plain])
    assert "".join(e.text_delta for e in stopped[0]) == answer[:answer.index(stop)]
    assert stopped[0][-1].finish_reason == "stop" and sum(e.finished for e in stopped[0]) == 1
    assert len([e for e in stopped[1] if e.token_id is not None]) == 10  # the other row ran to its length
    # the stopped row's slot is freed by the next step, not held until its length
    assert session.live_per_step[session.finished_at[0] + 1] == 1
    assert session.live_rows == 0 and not session.streams


def test_a_cancelled_row_gets_one_final_event_and_no_more(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    prompts = tiny_pipeline.prepare_each(enc, [("human", task_prompt("short"))], masks[:2])
    params = [SamplingParams(max_new_tokens=8)] * 2
    session, events = _session_events(tiny_pipeline, prompts, params, cancel_after=2)
    assert events[0][-1] == StreamEvent(0, "", None, True, "cancelled")
    assert sum(e.finished for e in events[0]) == 1 and len(events[0]) == 3  # two tokens, then the cancel
    assert len(events[1]) == 8 and events[1][-1].finish_reason == "length"
    assert session.live_rows == 0


def test_a_row_that_cannot_fit_is_refused_naming_it(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    (group,), _ = _decoder_rows(tiny_pipeline, enc, masks[:1], 4)
    decoder = tiny_pipeline.decoder(PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=1, suffix_tokens=8))
    with pytest.raises(ValueError, match="row 0 needs .* tokens of its own"):
        decoder.add(GroupRequest(group.prefix, [RowRequest(0, group.rows[0].suffix, SamplingParams(max_new_tokens=50))]))


def test_cascade_attention_equals_attention_over_the_concatenation():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 4, 8)
    k_a, v_a, k_b, v_b = (torch.randn(3, 2, n, 8) for n in (7, 7, 5, 5))
    bias_a, bias_b = length_bias(torch.tensor([7, 3, 1]), 7), length_bias(torch.tensor([5, 5, 2]), 5)
    out_a, lse_a = attend(q, k_a, v_a, bias_a, 0.3)
    out_b, lse_b = attend(q, k_b, v_b, bias_b, 0.3)
    merged = merge([(out_a.transpose(1, 2), lse_a.transpose(1, 2)), (out_b.transpose(1, 2), lse_b.transpose(1, 2))])
    full = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([k_a, k_b], 2), torch.cat([v_a, v_b], 2), attn_mask=torch.cat([bias_a, bias_b], -1), scale=0.3)
    torch.testing.assert_close(merged.transpose(1, 2), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_greedy_at_temperature_zero_and_seeded_rows_ignore_their_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    zero = torch.zeros(4)
    assert torch.equal(sample(logits, zero, torch.ones(4), torch.arange(4), zero.long(), True), logits.argmax(-1))
    temps, top_p = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.ones(4)
    seeds, steps = torch.tensor([7, 8, 9, 7]), torch.tensor([0, 0, 0, 0])
    batch = sample(logits, temps, top_p, seeds, steps, True)
    alone = sample(logits[:1], temps[:1], top_p[:1], seeds[:1], steps[:1], True)
    assert batch[0] == alone[0] and batch[2] == logits[2].argmax()
    # top_p that keeps only the best token is greedy, also below float32's smallest number (it rounds to 0)
    for tiny in (1e-6, 5e-324):
        top = torch.full((4,), tiny)
        assert torch.equal(sample(logits, torch.ones(4), top, seeds, steps, True), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    drawn = sample(logits, torch.ones(4000), torch.ones(4000), torch.arange(4000), torch.zeros(4000, dtype=torch.long), True)
    freq = torch.bincount(drawn, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_the_tempered_distribution(temperature):
    """Temperature T draws from softmax(logits / T): sharper below 1, flatter above."""
    base = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(base)[None].repeat(6000, 1)
    drawn = sample(logits, torch.full((6000,), temperature), torch.ones(6000), torch.arange(6000),
                   torch.zeros(6000, dtype=torch.long), True)
    freq = torch.bincount(drawn, minlength=3).float() / 6000
    torch.testing.assert_close(freq, torch.softmax(torch.log(base) / temperature, dim=0), atol=0.025, rtol=0)


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    """Two equally likely tokens (0.5 each, exact in float32): top_p = 0.5 is reached by the first alone, so every
    seed draws the same one; just above 0.5 both are kept and both are drawn."""
    logits = torch.zeros(400, 2)
    args = (torch.ones(400), torch.arange(400), torch.zeros(400, dtype=torch.long), True)
    at_half = sample(logits, args[0], torch.full((400,), 0.5), *args[1:])
    assert len(set(at_half.tolist())) == 1
    above = sample(logits, args[0], torch.full((400,), 0.51), *args[1:])
    assert set(above.tolist()) == {0, 1}


def test_the_sampling_noise_is_pinned_per_seed_step_and_token():
    """The noise behind a seeded answer is part of the API: the same seed must give the same answer after an
    upgrade. The 32-bit draws are pinned (exact: (bits + 0.5) / 2**32 in float64), and seeds that differ only
    above bit 32 draw differently."""
    noise = _uniform(torch.tensor([0, 5, 5 + 2**32, -7]), torch.tensor([0, 0, 0, 3]), 4)
    bits = noise * 2**32 - 0.5
    assert torch.equal(bits, bits.round()) and bool((noise > 0).all() and (noise < 1).all())
    assert bits.long().tolist() == [[0, 1051910520, 3951468376, 3373494168],
                                    [3251267254, 1468349218, 2063989488, 89441181],
                                    [2546808843, 1998320992, 260883449, 2046636969],
                                    [413986443, 3783742581, 32319777, 252327082]]


def test_text_stream_equals_full_decoding_and_cuts_stop_strings(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    ids = tok.encode("a red bottle, and two cups on the shelf", add_special_tokens=False)
    stream = TextStream(tok)
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    stream = TextStream(tok, stop=("two",))
    text = "".join(stream.push(t) for t in ids)
    assert stream.stopped and text == tok.decode(ids, skip_special_tokens=True).split("two")[0]


def test_pool_plan_fits_the_budget():
    size = plan_pool(10 * 2**20, per_token=1024, prefix_tokens=100, suffix_tokens=50, rows_per_image=4)
    assert size.prefix_slots == (10 * 2**20) // (1024 * 300) and size.row_slots == 4 * size.prefix_slots
    with pytest.raises(ValueError, match="not even one image"):
        plan_pool(1000, per_token=1024, prefix_tokens=100, suffix_tokens=50)


def test_text_stream_with_a_llama_sentencepiece_tokenizer(tmp_path):
    """The legacy Llama (Metaspace) decoder drops a leading space at the start of a decode: the stream's windows
    start on the same token on both sides, so the streamed text still equals one full decode."""
    import shutil
    from pathlib import Path

    from osprey.tokenization import load_tokenizer

    shutil.copy(Path(__file__).parent / "fixtures" / "tokenizer_golden" / "tokenizer.model", tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("A red bottle, and two cups on the shelf. It is 3.5 cm wide: yes!", add_special_tokens=False)
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == tok.decode(ids, skip_special_tokens=True)


def test_any_integer_seed_samples_reproducibly(tiny_pipeline, image, masks):
    """Seeds at the ends of the API's int64 range (and beyond) sample, and the same seed gives the same answer."""
    enc = tiny_pipeline.encode_image(image)
    (prompt,) = tiny_pipeline.prepare_each(enc, [("human", task_prompt("short"))], masks[:1])
    for seed in (-(2**63), 2**63 - 1, 2**70):
        params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed)
        first, again = (tiny_pipeline.generate([prompt], params)[0].raw_text for _ in range(2))
        assert first == again


def test_the_next_step_is_queued_before_the_tokens_in_flight_are_read(tiny_pipeline, image, masks, monkeypatch):
    """While a row decodes, each `step()` queues the next step (fed on the device) before it waits for the tokens of
    the one in flight; the step that would run past the row's budget is never queued."""
    from osprey.engine.transfer import HostCopy

    decoder, reference = _one_image_added(tiny_pipeline, image, masks[:1], 6,
                                          PoolSize(prefix_slots=1, prefix_tokens=2048, row_slots=2, suffix_tokens=64))
    order = []
    step_type = type(decoder.decode_step)
    launch, values = step_type.__call__, HostCopy.values
    monkeypatch.setattr(step_type, "__call__", lambda *a, **k: order.append("launch") or launch(*a, **k))
    monkeypatch.setattr(HostCopy, "values", lambda self: order.append("read") or values(self))
    assert list(_run(decoder).values()) == reference and len(reference[0]) == 6
    # the prefill samples token 1; launches A..E sample tokens 2..6
    assert order == ["launch"] + ["launch", "read"] * 4 + ["read"]


def test_a_sampled_rows_token_i_is_drawn_with_noise_counter_i(tiny_pipeline, image, masks):
    """Each token of a seeded, sampled row is what `sample` draws from transformers' own logits at its position with
    the noise counter at the token's index, though the decoder queues a step before the one feeding it has reached
    the host (the counter then counts the token still in flight)."""
    enc = tiny_pipeline.encode_image(image)
    (prompt,) = tiny_pipeline.prepare_each(enc, [("human", task_prompt("short"))], masks[:1])
    (tokens,) = _engine_tokens(tiny_pipeline, [prompt], SamplingParams(max_new_tokens=8, temperature=1.0, seed=11))
    assert len(tokens) >= 4
    lm = tiny_pipeline.model.language_model
    embeds = tiny_pipeline.model.merge_embeddings(prompt.input_ids[None], prompt.image.tokens[None],
                                                  prompt.mask_tokens, prompt.pos_tokens)
    one, seed = torch.ones(1), torch.tensor([11])
    with torch.inference_mode():
        for index, token in enumerate(tokens):
            fed = lm.get_input_embeddings()(torch.tensor([tokens[:index]], dtype=torch.long))
            logits = lm(inputs_embeds=torch.cat([embeds, fed], dim=1)).logits[0, -1:].float()
            assert sample(logits, one, one, seed, torch.tensor([index]), True).item() == token


_TRITON_CHECK = """
import torch
from osprey.engine.decode_attention import decode_attention, decode_layout
from osprey.engine.forward import _reference_decode
torch.manual_seed(0)
group = torch.tensor([2, 0, 0, 1, 2, 0] + [0] * 17)  # image 0 has 19 rows: two 16-row query blocks
prefix_used, suffix_used = torch.tensor([40, 7, 1]), torch.randint(1, 25, (23,))
q = torch.randn(23, 4, 16).half()
pk, pv = (torch.randn(4, 40, 2, 16).half() for _ in range(2))  # slot 3 holds no image (a padded graph group)
sk, sv = (torch.randn(23, 24, 2, 16).half() for _ in range(2))
reference = _reference_decode(q.float(), pk[:3].float(), pv[:3].float(), sk.float(), sv.float(), group, prefix_used,
                              suffix_used, 0.3)
for splits in (1, 3):
    layout = decode_layout(group, 4, torch.cat([prefix_used, torch.tensor([1])]), suffix_used, splits)
    out = decode_attention(q, pk, pv, sk, sv, layout, 0.3)
    print(splits, float((out - reference).abs().max()))
"""


def test_the_triton_decoding_kernels_equal_dense_attention_under_the_interpreter():
    """The GPU decoding kernels, run by Triton's CPU interpreter: a 16-row query block per image with its prefix in
    1 or 3 chunks, two blocks for a 19-row image, an image slot without rows, grouped query heads, each row's own
    suffix; against dense fp32 attention over [prefix + suffix]."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = {int(line.split()[0]): float(line.split()[1]) for line in result.stdout.split("\n") if line.strip()}
    assert set(errors) == {1, 3} and max(errors.values()) < 2e-3, errors


def test_the_written_out_layer_math_equals_the_transformers_modules():
    """The functions the GPU compiles (norm, projections, rotary, MLP, residuals as tensor functions) give exactly
    what the modules give, run eagerly: the compiled path differs only by Inductor's fusion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osprey.engine.compiled import CompiledLayers, merge_projections, plain_linears
    from osprey.engine.forward import LlamaForward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5))
    forward = LlamaForward(model)
    assert plain_linears(model.model) and forward.fused is None  # eager modules on CPU
    written = CompiledLayers(forward, merge_projections(model.model), compiled=False)
    hidden, attention = torch.randn(5, 64), torch.randn(5, 64)
    cos, sin = forward._rope(hidden, torch.arange(3, 8))
    for layer in model.model.layers:
        for ours, theirs in zip(written.qkv(layer, hidden, cos, sin), forward._qkv(layer, hidden, cos, sin)):
            assert torch.equal(ours, theirs)
        assert torch.equal(written.finish(layer, hidden, attention), forward._finish_layer(layer, hidden, attention))


def test_merged_projections_are_stored_once_reused_and_saved_as_before(tiny_pipeline, tmp_path):
    """The merged q/k/v and gate/up weights hold the modules' own values, the modules' weights become views into
    them (nothing stored twice), a second engine reuses them, and the model saves and loads as before."""
    from osprey.checkpoint import save_pretrained
    from osprey.engine.compiled import merge_projections
    from osprey.inference import OspreyPipeline

    model = tiny_pipeline.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.language_model.model.layers
    merged = merge_projections(model.language_model.model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert torch.equal(merged[layers[0]].qkv, torch.cat([before[f"language_model.model.layers.0.self_attn.{n}_proj.weight"]
                                                         for n in "qkv"]))
    assert attn.k_proj.weight.data_ptr() == merged[layers[0]].qkv[attn.q_proj.weight.shape[0]].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == merged[layers[0]].gate_up[mlp.gate_proj.weight.shape[0]].data_ptr()
    again = merge_projections(model.language_model.model)
    assert all(again[layer].qkv is merged[layer].qkv and again[layer].gate_up is merged[layer].gate_up
               for layer in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    save_pretrained(model, tiny_pipeline.tokenizer, tmp_path / "saved")
    reloaded = OspreyPipeline.from_pretrained(tmp_path / "saved", device="cpu").model.state_dict()
    assert all(torch.equal(reloaded[k], before[k]) for k in before)


def test_text_stream_holds_back_what_could_start_a_stop_string(tiny_pipeline):
    """The earliest of several stop strings wins, even one that arrives over several tokens; nothing of it is ever
    emitted, `text` is what was emitted, and after the stop the stream is silent."""
    tok = tiny_pipeline.tokenizer
    ids = tok.encode("a red bottle, and two cups on the shelf", add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    stream = TextStream(tok, stop=("", "shelf", "two cups", "bottle"))
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped and "".join(pieces) == stream.text == full.split("bottle")[0]
    assert all("bott" not in piece for piece in pieces)
    assert stream.push(ids[0]) == "" and stream.flush() == "" and stream.text == full.split("bottle")[0]
    # a stop string that never comes: the held-back tail is released by flush, and the whole text arrives
    stream = TextStream(tok, stop=("cups on the shelf!",))
    pieces = [stream.push(t) for t in ids]
    assert not stream.stopped and len(full) - len("".join(pieces)) == len("cups on the shelf!") - 1
    assert "".join(pieces) + stream.flush() == stream.text == full


def test_pool_sizes_are_checked_and_token_bytes_count_keys_and_values():
    with pytest.raises(ValueError, match="row_slots must be >= 1, got 0"):
        PoolSize(prefix_slots=1, prefix_tokens=1, row_slots=0, suffix_tokens=1)
    assert token_bytes(num_layers=3, num_kv_heads=4, head_dim=8, dtype=torch.float16) == 2 * 3 * 4 * 8 * 2
    exact = plan_pool(1024 * 300, per_token=1024, prefix_tokens=100, suffix_tokens=50, rows_per_image=4)
    assert (exact.prefix_slots, exact.prefix_tokens, exact.row_slots, exact.suffix_tokens) == (1, 100, 4, 50)
    with pytest.raises(ValueError, match=r"holds not even one image \(0.00 GiB for 100 prefix and 4 x 50 row tokens\)"):
        plan_pool(1024 * 300 - 1, per_token=1024, prefix_tokens=100, suffix_tokens=50, rows_per_image=4)
    partial = plan_pool(1024 * 300 * 5 // 2, per_token=1024, prefix_tokens=100, suffix_tokens=50, rows_per_image=4)
    assert (partial.prefix_slots, partial.row_slots) == (2, 8)  # whole images only: 2.5 fit, 2 are planned
    with pytest.raises(ValueError, match=r"a KV budget of 0.25 GiB holds not even one image \(0.29 GiB for"):
        plan_pool(2**28, per_token=2**20, prefix_tokens=100, suffix_tokens=50, rows_per_image=4)


def test_the_kv_pool_moves_slots_in_every_layer_keys_and_values():
    """Freed slots are refilled by moving the last live one (kv.py): each move must copy that slot's keys and values
    of every layer onto the target and leave the other slots alone."""
    pool = KVPool(PoolSize(3, 4, 5, 2), num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float16,
                  device=torch.device("cpu"))
    tensors = pool.prefix_k + pool.prefix_v + pool.suffix_k + pool.suffix_v
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in tensors)
    for n, tensor in enumerate(tensors):
        tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape) + 100 * n)  # exact in float16
    before = [t.clone() for t in tensors]
    pool.move_rows([4, 3], [0, 2])
    pool.move_prefix(2, 1)
    for n, (tensor, old) in enumerate(zip(tensors, before)):
        moves = {1: 2} if n < 4 else {0: 4, 2: 3}
        expected = old.clone()
        for target, source in moves.items():
            expected[target] = old[source]
        assert torch.equal(tensor, expected), n


def test_prefixes_prefilled_together_store_the_keys_and_values_of_each_alone(tiny_pipeline):
    """Three prefixes of different lengths in one packed causal pass, into slots out of order: every layer's keys and
    values in each slot equal transformers' own cache for that prefix alone, and the slots' tails stay untouched."""
    from osprey.engine.forward import LlamaForward

    lm = tiny_pipeline.model.language_model
    config = lm.config
    torch.manual_seed(0)
    prefixes = [torch.randn(length, config.hidden_size) for length in (7, 3, 12)]
    forward = LlamaForward(lm)
    pool = KVPool(PoolSize(4, 16, 1, 1), forward.num_layers, forward.num_kv_heads, forward.head_dim, torch.float32,
                  torch.device("cpu"))
    forward.prefill_prefixes(prefixes, pool, [2, 0, 3])
    for prefix, slot in zip(prefixes, [2, 0, 3]):
        with torch.inference_mode():
            cache = lm(inputs_embeds=prefix[None], use_cache=True).past_key_values
        for layer in range(forward.num_layers):
            keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (Hkv, P, d)
            torch.testing.assert_close(pool.prefix_k[layer][slot, :len(prefix)], keys.transpose(0, 1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pool.prefix_v[layer][slot, :len(prefix)], values.transpose(0, 1), atol=1e-5, rtol=1e-5)
            assert not pool.prefix_k[layer][slot, len(prefix):].any()
    assert not any(pool.prefix_k[layer][1].any() for layer in range(forward.num_layers))


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
    ({"temperature": float("nan")}, "temperature must be >= 0, got nan"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
])
def test_sampling_params_refuse_values_outside_their_range(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings)


def test_sampling_params_accept_their_bounds_and_keep_stops_as_a_tuple():
    params = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, stop=["a", "b"])
    assert params.stop == ("a", "b") and hash(params)  # frozen and hashable with a list given
    assert SamplingParams() == SamplingParams(max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, stop=())


def test_text_stream_cuts_at_the_first_occurrence_and_waits_for_whole_characters(tmp_path):
    import shutil
    from pathlib import Path

    from osprey.tokenization import load_tokenizer

    shutil.copy(Path(__file__).parent / "fixtures" / "tokenizer_golden" / "tokenizer.model", tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("a red bottle, and two cups", add_special_tokens=False)
    stream = TextStream(tok, stop=("e", "zzzzzzzzzz"))  # the long stop keeps a 9-character window held
    assert "".join(stream.push(t) for t in ids) == "a r" and stream.stopped
    stream = TextStream(tok, stop=("o",))  # the token "oo" holds the stop string twice: cut at the first
    assert "".join(stream.push(t) for t in tok.encode("a good book", add_special_tokens=False)) == "a g"
    # byte-fallback tokens: nothing is emitted while a character is incomplete, and flush returns what a full
    # decode of the tokens gives, even for a stream cut inside a character
    ids = tok.encode("naïve café 🦜 ok 龘", add_special_tokens=False)  # 🦜 and 龘 are byte tokens
    full = tok.decode(ids, skip_special_tokens=True)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == full
    cut = ids[:-1]  # the last character's bytes, one short
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in cut) + stream.flush() == tok.decode(cut, skip_special_tokens=True)


def test_text_stream_without_stops_holds_nothing_and_skips_special_tokens(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    ids = tok.encode("a red bottle", add_special_tokens=False)
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in ids + [tok.eos_token_id]) == tok.decode(ids)  # no flush needed
    stream = TextStream(tok, stop=("a red",))  # a stop string at the very start: nothing of it is sent
    assert [stream.push(t) for t in ids][:2] == ["", ""] and stream.stopped and stream.text == ""
