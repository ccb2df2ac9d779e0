"""The vLLM model of Osprey (serve/vllm_osprey): what runs without vLLM (prompt ids and placeholder expansion, region
binding and prefix keying, the weight-name routing through osprey.checkpoint's one map, the backend's prompt checks
and its token->event translation), then vLLM's own processing and prefix-block hashing (skipped without vLLM) and
the model's embeddings against our pipeline's (a GPU with vLLM)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.serve_vllm import llm_half_engine_args
from osprey.checkpoint import from_official, to_official
from osprey.engine.session import StreamEvent
from osprey.inference import OspreyPipeline
from osprey.prompts import REGION_PLACEHOLDER, task_prompt
from serve.vllm_osprey.backend import VllmBackend, _Delta
from serve.vllm_osprey.prompts import (
    REGION_MODALITY,
    RegionItem,
    check_region_count,
    expand_prompt,
    expanded_length,
    generation_prompt_ids,
    image_content_key,
    image_placeholder_id,
    prefix_length,
    region_items,
    weight_target,
)

SHORT = [("human", task_prompt("short"))]
FP32_CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # fp32 on one device, batches of other sizes (their kernels may differ)
TWO_REGIONS = [("human", f"<image>\nWhat is {REGION_PLACEHOLDER} next to {REGION_PLACEHOLDER}?")]


def _image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _masks(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    masks = np.zeros((count, height, width), bool)
    for q in range(count):
        masks[q, 4 * q:4 * q + 10, 3 * q:3 * q + 20] = True
    return masks


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """The backend before `load` (vLLM is only started by load): its prompt preparation runs on its own."""
    return VllmBackend(str(tiny_model_dir))


# -- prompts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("turns", [SHORT, TWO_REGIONS])
def test_expanded_prompt_equals_our_engines_ids(tiny_pipeline, turns):
    """One image placeholder, expanded as vLLM's processor does, gives exactly our engine's ids (-200 = placeholder)."""
    config = tiny_pipeline.config
    ids = generation_prompt_ids(tiny_pipeline.tokenizer, config, turns)
    assert ids.count(image_placeholder_id(config)) == 1
    expanded = expand_prompt(ids, config)
    ours = tiny_pipeline._prompt_ids(turns).tolist()
    assert [config.image_token_id if t == image_placeholder_id(config) else t for t in expanded] == ours
    assert expanded_length(ids, config) == len(ours)
    assert expanded.count(config.mask_token_id) == expanded.count(config.pos_token_id) == turns[0][1].count("<mask>")


def test_image_placeholder_is_outside_the_table_and_distinct(tiny_pipeline):
    config = tiny_pipeline.config
    placeholder = image_placeholder_id(config)
    assert placeholder >= config.vocab_size
    assert placeholder not in (config.mask_token_id, config.pos_token_id)


def test_prompt_checks_name_the_problem(tiny_pipeline):
    config, tokenizer = tiny_pipeline.config, tiny_pipeline.tokenizer
    with pytest.raises(ValueError, match="no <image> placeholder"):
        generation_prompt_ids(tokenizer, config, [("human", "What is <mask><pos>?")])
    with pytest.raises(ValueError, match="more than one <image>"):
        generation_prompt_ids(tokenizer, config, [("human", "<image>\n<image>\nWhat is <mask><pos>?")])
    ids = generation_prompt_ids(tokenizer, config, TWO_REGIONS)
    check_region_count(ids, config, 2)
    with pytest.raises(ValueError, match="references 2 regions .* but 3 masks"):
        check_region_count(ids, config, 3)
    lone_mask = generation_prompt_ids(tokenizer, config, [("human", "<image>\nWhat is <mask> here?")])
    with pytest.raises(ValueError, match="followed by exactly one <pos>"):
        check_region_count(lone_mask, config, 1)


# -- prefix keying ----------------------------------------------------------------------------------------------
def test_region_slots_follow_every_image_slot_and_the_shared_prefix(tiny_pipeline):
    """vLLM keys a KV block by its ids and the items whose slots it holds: every block before the first region slot
    holds only the image's slots and text, the same for every region of one image."""
    config = tiny_pipeline.config
    expanded = expand_prompt(generation_prompt_ids(tiny_pipeline.tokenizer, config, SHORT), config)
    split = prefix_length(expanded, config)
    image_slots = [i for i, t in enumerate(expanded) if t == image_placeholder_id(config)]
    assert len(image_slots) == config.vision.num_image_tokens
    assert max(image_slots) < split and expanded[split] == config.mask_token_id
    assert split == tiny_pipeline._prefix_length(tiny_pipeline._prompt_ids(SHORT))


def test_image_key_ignores_masks_and_region_items_name_their_image():
    """The image item is the image alone (its hash cannot depend on the masks); a region item is its mask AND its
    image (vLLM's encoder cache is keyed by item hash, and one mask on two images has two embeddings)."""
    image, other = _image(0), _image(1)
    masks = _masks(2)
    first, second = region_items(image, masks)
    assert image_content_key(image) == image_content_key(_image(0)) != image_content_key(other)
    assert first.image is second.image is image
    assert not np.array_equal(first.mask, second.mask)
    on_other = region_items(other, masks[:1])[0]
    assert np.array_equal(on_other.mask, first.mask) and on_other.image is not first.image
    assert set(first.as_data()) == {"mask", "image"}
    assert RegionItem.from_data(first.as_data()) == first
    with pytest.raises(ValueError, match="match the image"):
        region_items(image, _masks(1, 20, 20))


# -- weights ------------------------------------------------------------------------------------------------------
def test_every_folder_key_has_a_place_through_the_shared_map(tiny_model_dir, tiny_pipeline):
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    ours = dict(tiny_pipeline.model.state_dict())
    parts = set()
    for name in state:
        target = weight_target(name)
        mapped = "language_model." + target.name if target.in_language_model else target.name
        assert mapped == from_official(name) and mapped in ours, name
        assert to_official(mapped) == name
        parts.add(mapped.split(".")[0])
    assert parts == {"vision_tower", "mm_projector", "mask_extractor", "language_model"}
    assert len(state) == len(ours)


def test_legacy_layer_scale_names_reach_gamma():
    legacy = "model.vision_tower.vision_tower.visual.trunk.stages.1.blocks.2.weight"
    assert weight_target(legacy).name == "vision_tower.vision_tower.visual.trunk.stages.1.blocks.2.gamma"
    assert weight_target("model.layers.0.self_attn.q_proj.weight").in_language_model
    assert weight_target("lm_head.weight").name == "lm_head.weight"


# -- the backend without vLLM -------------------------------------------------------------------------------------
def test_backend_prepares_our_pipelines_prompts(backend, tiny_pipeline):
    image = _image(2)
    masks = _masks(3)
    encoded = backend.encode_image(image)
    rows = backend.prepare_each(encoded, SHORT, masks)
    reference = tiny_pipeline.prepare_each(tiny_pipeline.encode_image(image), SHORT, masks)
    assert [r.num_tokens for r in rows] == [p.num_tokens for p in reference]
    assert all(np.array_equal(r.masks[0], m) for r, m in zip(rows, masks))
    chat = backend.prepare(encoded, TWO_REGIONS, masks[:2])
    assert chat.num_tokens == tiny_pipeline.prepare(tiny_pipeline.encode_image(image), TWO_REGIONS, masks[:2]).num_tokens


def test_backend_refuses_what_the_pipeline_refuses(backend):
    encoded = backend.encode_image(_image(3))
    with pytest.raises(ValueError, match="references 2 regions .* but 1 masks"):
        backend.prepare(encoded, TWO_REGIONS, _masks(1))
    with pytest.raises(ValueError, match="to match the image"):
        backend.prepare(encoded, TWO_REGIONS, _masks(2, 10, 10))
    with pytest.raises(ValueError, match="references 2 regions .* but 1 masks"):
        backend.prepare_each(encoded, TWO_REGIONS, _masks(3))


def test_backend_turns_vllm_tokens_into_our_events(tiny_model_dir):
    """Token deltas -> text events: EOS ends a row without a token, a stop string ends it early, vLLM's reasons map
    to ours, a failed request is an "error" row (the server answers that request 500)."""
    from osprey.engine.text import TextStream

    backend = VllmBackend(str(tiny_model_dir))
    tokenizer, eos = backend.tokenizer, backend.eos_token_id
    words = tokenizer("a red car", add_special_tokens=False)["input_ids"]

    def start(row_id: int, stop: tuple[str, ...] = ()) -> None:
        from serve.vllm_osprey.backend import _Row

        backend._rows[row_id] = _Row(TextStream(tokenizer, stop))

    start(0)
    events = backend._to_events(_Delta(0, words[:1]))
    events += backend._to_events(_Delta(0, [*words[1:], eos], "stop"))
    assert "".join(e.text_delta for e in events).strip() == "a red car"
    assert [e.token_id for e in events] == words and events[-1] == StreamEvent(0, events[-1].text_delta, words[-1],
                                                                                True, "stop")
    assert not backend.has_work

    start(1, stop=("red",))
    events = backend._to_events(_Delta(1, words))
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert "red" not in "".join(e.text_delta for e in events)
    assert 1 not in backend._rows

    start(2)
    assert backend._to_events(_Delta(2, words, "length"))[-1].finish_reason == "length"
    start(3)
    assert backend._to_events(_Delta(3, [], "abort"))[-1].finish_reason == "cancelled"
    start(4)
    failed = backend._to_events(_Delta(4, [], "error", error="RuntimeError: boom"))
    assert failed == [StreamEvent(4, "", None, True, "error")]
    start(5)
    backend.cancel(5)
    assert backend._to_events(_Delta(5, words)) == []  # a cancelled row's late tokens are dropped


# -- vLLM's own processing (needs vLLM) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_config(tiny_model_dir):
    """vLLM's config for the tiny folder with our backend's limits per prompt. The device is named: on a machine
    without an accelerator vLLM infers none."""
    pytest.importorskip("vllm")
    import serve.vllm_osprey as plugin

    plugin.register()
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    import serve.vllm_osprey.model  # noqa: F401  (registers the processor with vLLM's multimodal registry)

    model_config = ModelConfig(model=str(tiny_model_dir), skip_tokenizer_init=True, dtype="float32",
                               limit_mm_per_prompt={"image": 1, REGION_MODALITY: 64})
    return VllmConfig(model_config=model_config,
                      device_config=DeviceConfig(device="cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="module")
def vllm_processor(vllm_config):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(vllm_config.model_config)


def _process(processor, ids, image, masks=None, **kwargs):
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    data = {"image": image} if masks is None else {"image": image, REGION_MODALITY: masks}
    inputs = ProcessorInputs(ids, processor.info.parse_mm_data(data), hf_processor_mm_kwargs=kwargs)
    return processor.apply(inputs, TimingContext(enabled=False))


def _runner_batch(modality: str, items: list) -> dict:
    """What vLLM's model runner passes to `embed_multimodal` for these items of one modality (its own batching)."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    ((_, count, batch),) = group_and_batch_mm_kwargs([(modality, item) for item in items])
    assert count == len(items)
    return batch


def test_vllm_processor_expands_and_keys_items(vllm_processor, tiny_pipeline):
    config = tiny_pipeline.config
    ids = generation_prompt_ids(tiny_pipeline.tokenizer, config, SHORT)
    image, masks = _image(4), _masks(2)
    first = _process(vllm_processor, ids, image, masks[:1])
    second = _process(vllm_processor, ids, image, masks[1:])
    assert first["prompt_token_ids"] == expand_prompt(ids, config) == second["prompt_token_ids"]
    (image_range,) = first["mm_placeholders"]["image"]
    (region_range,) = first["mm_placeholders"][REGION_MODALITY]
    assert (image_range.length, region_range.length) == (config.vision.num_image_tokens, 2)
    assert region_range.offset == prefix_length(first["prompt_token_ids"], config)
    assert first["mm_hashes"]["image"] == second["mm_hashes"]["image"]  # masks never reach the image's hash
    assert first["mm_hashes"][REGION_MODALITY] != second["mm_hashes"][REGION_MODALITY]
    on_other = _process(vllm_processor, ids, _image(5), masks[:1])
    assert on_other["mm_hashes"][REGION_MODALITY] != first["mm_hashes"][REGION_MODALITY]
    from_kwargs = _process(vllm_processor, ids, image, regions=[{"box": [3, 0, 20, 10]}])
    assert from_kwargs["mm_hashes"]["image"] == first["mm_hashes"]["image"]
    with pytest.raises(ValueError, match="references 1 regions .* but 2 masks"):
        _process(vllm_processor, ids, image, masks)


def test_vllm_profiling_inputs_have_each_modalitys_size(vllm_config, tiny_pipeline):
    """vLLM sizes its encoder budget from `get_mm_max_tokens_per_item` and profiles memory with the dummy builder's
    items, batched as the model runner batches them: both must agree with what real requests produce."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    config = tiny_pipeline.config
    budget = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY)
    assert budget.mm_max_toks_per_item == {"image": config.vision.num_image_tokens, REGION_MODALITY: 2}
    assert budget.mm_max_items_per_prompt == {"image": 1, REGION_MODALITY: 64}
    fields = {"image": {"pixel_values", "image_key"},
              REGION_MODALITY: {"region_masks", "region_pixel_values", "region_image_key"}}
    for modality, names in fields.items():
        dummy = MULTIMODAL_REGISTRY.get_dummy_mm_inputs(vllm_config.model_config, mm_counts={modality: 1},
                                                        cache=budget.cache)
        (placeholder,) = dummy["mm_placeholders"][modality]
        assert placeholder.length == budget.mm_max_toks_per_item[modality]
        batch = _runner_batch(modality, [dummy["mm_kwargs"][modality][0]] * 3)
        assert set(batch) == names and all(len(value) == 3 for value in batch.values())


def test_vllm_input_processor_makes_the_backends_engine_request(vllm_config, backend, tiny_pipeline):
    """What AsyncLLM.generate does with the backend's TokensPrompt before the engine core sees it: vLLM's input
    processor expands the ids and places the image and each region where our prompt has them, and the request
    survives the msgpack trip to the engine process."""
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from osprey.generation import SamplingParams

    config = tiny_pipeline.config
    prompt = backend.prepare(backend.encode_image(_image(8)), TWO_REGIONS, _masks(2))
    processor = InputProcessor(vllm_config, renderer_from_config(vllm_config))
    request = processor.process_inputs("r0", backend.tokens_prompt(prompt),
                                       backend.sampling_params(SamplingParams(max_new_tokens=4)),
                                       supported_tasks=("generate",))
    expanded = expand_prompt(prompt.token_ids, config)
    assert request.prompt_token_ids == expanded and len(expanded) == prompt.num_tokens
    pairs = [i for i, t in enumerate(expanded) if t == config.mask_token_id]
    assert [(f.modality, f.mm_position.offset, f.mm_position.length) for f in request.mm_features] == [
        ("image", expanded.index(image_placeholder_id(config)), config.vision.num_image_tokens),
        *[(REGION_MODALITY, offset, 2) for offset in pairs]]
    sent = MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(request))
    assert sent.prompt_token_ids == expanded
    assert [f.mm_hash for f in sent.mm_features] == [f.mm_hash for f in request.mm_features]


def test_engine_arguments_make_vllms_model_config(backend, tiny_pipeline, tmp_path):
    """The engine arguments of the backend and of the benchmark's LLM half are vLLM 0.26's and give the model config
    they mean (the rest of the engine config needs the GPU's platform)."""
    pytest.importorskip("vllm")
    import serve.vllm_osprey as plugin

    plugin.register()
    config = tiny_pipeline.config
    ours = backend.engine_args().create_model_config()
    assert (ours.architecture, ours.max_model_len, ours.is_multimodal_model) == ("OspreyLlamaForCausalLM", 1024, True)
    assert {m: o.count for m, o in ours.multimodal_config.limit_per_prompt.items()} == {"image": 1, REGION_MODALITY: 64}
    llm_half = llm_half_engine_args(tiny_pipeline, tmp_path).create_model_config()
    assert (llm_half.architecture, llm_half.max_model_len) == ("LlamaForCausalLM", config.text["max_position_embeddings"])
    assert (llm_half.get_hidden_size(), llm_half.get_vocab_size()) == (config.hidden_size, config.vocab_size)


def test_vllm_prefix_blocks_are_shared_by_the_regions_of_one_image(vllm_processor, tiny_pipeline):
    """vLLM's own block hasher over two requests with the same image and different masks: every full block before
    the first region slot hashes the same, the block holding the region slot differs."""
    from vllm import SamplingParams
    from vllm.multimodal.inputs import MultiModalFeatureSpec
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    config = tiny_pipeline.config
    ids = generation_prompt_ids(tiny_pipeline.tokenizer, config, SHORT)
    init_none_hash(sha256)
    block = 16
    hashes = []
    for index, masks in enumerate((_masks(2)[:1], _masks(2)[1:])):
        out = _process(vllm_processor, ids, _image(6), masks)
        features = [MultiModalFeatureSpec(data=None, modality=m, identifier=h, mm_position=r, mm_hash=h)
                    for m in ("image", REGION_MODALITY)
                    for h, r in zip(out["mm_hashes"][m], out["mm_placeholders"][m])]
        request = Request(f"r{index}", out["prompt_token_ids"], SamplingParams(max_tokens=1), None,
                          mm_features=features, block_hasher=get_request_block_hasher(block, sha256))
        hashes.append(list(request.block_hashes))
    split = prefix_length(expand_prompt(ids, config), config)
    shared = split // block
    assert shared >= 1 and hashes[0][:shared] == hashes[1][:shared]
    assert hashes[0][shared] != hashes[1][shared]


# -- the model on a GPU (needs vLLM) ------------------------------------------------------------------------------
def check_model_embeddings(model, processor, pipeline, device: str) -> None:
    """Image and region embeddings of two images (two sizes), batched as vLLM's runner batches them, and the input
    embeddings vLLM merges from them, equal our pipeline's (fp32, `pipeline` on the model's device; the batches
    differ, so the convolutions may too: FP32_CLOSE). vLLM's memory profiling repeats one image item: the tower must
    see every copy (else the profiled peak is one image's)."""
    config = pipeline.config
    three = "<image>\nA <mask><pos> B <mask><pos> C <mask><pos>"
    requests = [(_image(7), _masks(3)), (_image(9, 40, 56), _masks(3, 40, 56))]
    outs = [_process(processor, generation_prompt_ids(pipeline.tokenizer, config, [("human", three)]), image, masks)
            for image, masks in requests]
    image_embeds = _embed_items(model, "image", [item for out in outs for item in out["mm_kwargs"]["image"]], device)
    region_embeds = _embed_items(model, REGION_MODALITY,
                                 [item for out in outs for item in out["mm_kwargs"][REGION_MODALITY]], device)
    for index, ((image, masks), out) in enumerate(zip(requests, outs)):
        encoded = pipeline.encode_image(image)
        mask_tokens, pos_tokens = pipeline.region_tokens(encoded, masks)
        pairs = torch.stack(region_embeds[3 * index:3 * index + 3])
        torch.testing.assert_close(image_embeds[index], encoded.tokens.cpu(), **FP32_CLOSE)
        torch.testing.assert_close(pairs[:, 0], mask_tokens.cpu(), **FP32_CLOSE)
        torch.testing.assert_close(pairs[:, 1], pos_tokens.cpu(), **FP32_CLOSE)
        ids = torch.tensor(out["prompt_token_ids"])
        is_multimodal = torch.zeros(len(ids), dtype=torch.bool)
        for placeholder in [*out["mm_placeholders"]["image"], *out["mm_placeholders"][REGION_MODALITY]]:
            is_multimodal[placeholder.offset:placeholder.offset + placeholder.length] = True
        with torch.inference_mode():
            merged = model.embed_input_ids(ids.to(device), [image_embeds[index].to(device), *pairs.to(device)],
                                           is_multimodal=is_multimodal.to(device)).cpu()
        ours = pipeline._prompt_ids([("human", three)])[None]
        reference = pipeline._merge(ours, encoded, mask_tokens, pos_tokens)[0].cpu()
        torch.testing.assert_close(merged, reference, **FP32_CLOSE)

    tower_batches = []
    hook = model.vision_tower.register_forward_hook(lambda module, args, out: tower_batches.append(len(args[0])))
    repeated = _embed_items(model, "image", [outs[0]["mm_kwargs"]["image"][0]] * 4, device)
    hook.remove()
    assert tower_batches == [4] and len(repeated) == 4
    torch.testing.assert_close(repeated[3], image_embeds[0], **FP32_CLOSE)


def _embed_items(model, modality: str, items: list, device: str) -> list[torch.Tensor]:
    """`embed_multimodal` on the runner's batch of `items` (moved to `device`), checked by the runner's own output
    check, back on the CPU."""
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    batch = _runner_batch(modality, items)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v] for k, v in batch.items()}
    with torch.inference_mode():
        outputs = model.embed_multimodal(**moved)
    sanity_check_mm_encoder_outputs(outputs, expected_num_items=len(items))
    return [e.cpu() for e in outputs]


@pytest.mark.gpu
def test_vllm_model_embeddings_equal_our_pipelines(vllm_config, vllm_processor, tiny_model_dir):
    """The vLLM model built by vLLM's config, loaded through load_weights: 0 missing weights; image and region
    embeddings and the merged input embeddings equal our pipeline's (check_model_embeddings)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from serve.vllm_osprey.model import OspreyVllmForCausalLM

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(1, 0, "tcp://127.0.0.1:29573", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        model = OspreyVllmForCausalLM(vllm_config=vllm_config).to("cuda")
    loaded = model.load_weights(load_file(str(tiny_model_dir / "model.safetensors")).items())
    assert {n for n, _ in model.named_parameters()} == loaded
    pipeline = OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=torch.float32)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions on both sides
        check_model_embeddings(model, vllm_processor, pipeline, "cuda")


# -- vLLM's own server --------------------------------------------------------------------------------------------
def test_chat_template_renders_our_inference_conversation():
    """`vllm serve --chat-template serve/vllm_osprey/chat_template.jinja` renders what osprey.prompts renders."""
    import jinja2

    from osprey.prompts import TEMPLATES

    template = jinja2.Environment().from_string(
        (Path(__file__).parents[1] / "serve" / "vllm_osprey" / "chat_template.jinja").read_text())
    turns = [("human", "<image>\nWhat is <mask><pos>?"), ("gpt", "a dog"), ("human", "And <mask><pos>?")]
    messages = [{"role": "user" if role == "human" else "assistant", "content": text} for role, text in turns]
    assert template.render(messages=messages, add_generation_prompt=True) == TEMPLATES["infer"].render(
        [*turns, ("gpt", None)])
    parts = [{"role": "user", "content": [{"type": "text", "text": "<image>\nWhat is <mask><pos>?"}]}]
    assert template.render(messages=parts, add_generation_prompt=True) == TEMPLATES["infer"].render(
        [turns[0], ("gpt", None)])


def test_vllm_server_chat_reaches_our_engines_ids(tiny_model_dir, tiny_pipeline, tmp_path):
    """`vllm serve` with docs/vllm.md's tokenizer folder and our chat template: a chat request (image_url part, the
    region as a box in mm_processor_kwargs) rendered by vLLM's own renderer as its OpenAI server renders it gives
    exactly our engine's ids, the region's slots at our `<mask><pos>`."""
    pytest.importorskip("vllm")
    import serve.vllm_osprey as plugin

    plugin.register()
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    import serve.vllm_osprey.model  # noqa: F401  (registers the processor with vLLM's multimodal registry)

    config = tiny_pipeline.config
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == image_placeholder_id(config)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model_config = ModelConfig(model=str(tiny_model_dir), tokenizer=str(tmp_path / "tokenizer"), dtype="float32",
                               limit_mm_per_prompt={"image": 1, REGION_MODALITY: 64})
    vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"))
    renderer = renderer_from_config(vllm_config)
    png = io.BytesIO()
    _image(11).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    request = ChatCompletionRequest(model=str(tiny_model_dir), mm_processor_kwargs={"regions": [{"box": [3, 0, 20, 10]}]},
                                    messages=[{"role": "user", "content": [
                                        {"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What is <mask><pos> doing?"}]}])
    template = (Path(__file__).parents[1] / "serve" / "vllm_osprey" / "chat_template.jinja").read_text()
    chat_params = request.build_chat_params(template, "auto").with_defaults(
        None, default_mm_processor_kwargs=request.mm_processor_kwargs)
    _, (rendered,) = renderer.render_chat([request.messages], chat_params, request.build_tok_params(model_config),
                                          prompt_extras={"mm_processor_kwargs": request.mm_processor_kwargs})
    ours = tiny_pipeline._prompt_ids([("human", "<image>\nWhat is <mask><pos> doing?")]).tolist()
    theirs = [config.image_token_id if t == image_placeholder_id(config) else t for t in rendered["prompt_token_ids"]]
    assert theirs == ours
    (region,) = rendered["mm_placeholders"][REGION_MODALITY]
    assert (region.offset, region.length) == (ours.index(config.mask_token_id), 2)
    engine_request = InputProcessor(vllm_config, renderer).process_inputs(  # checks every id against the vocabulary
        "chat-0", rendered, SamplingParams(max_tokens=8), supported_tasks=("generate",))
    assert engine_request.prompt_token_ids == rendered["prompt_token_ids"]


def test_serve_backend_vllm_says_what_is_missing(tiny_model_dir, capsys):
    """Without vLLM, `osprey serve --backend vllm` names the extra and exits 2 before binding a port; bad vLLM
    settings are refused by name."""
    import argparse
    import importlib.util

    from serve import cli
    from serve.vllm_osprey.backend import VllmSize

    parser = argparse.ArgumentParser(prog="osprey")
    cli.register(parser.add_subparsers(dest="command", required=True))
    if importlib.util.find_spec("vllm") is None:
        args = parser.parse_args(["serve", "--model", str(tiny_model_dir), "--backend", "vllm"])
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert "osprey-regions[vllm]" in err and "docs/vllm.md" in err
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmSize(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        VllmSize(max_num_seqs=0)


def test_gpu_check_requests_are_valid_on_our_engine(tiny_model_dir, tmp_path):
    """bench/vllm_osprey_check.py's API requests, sent to the same server on our engine (CPU, tiny model): describe,
    chat and the streamed chat answer 200, the bad request gets its 400. On the GPU the same requests go to vLLM."""
    import json

    from fastapi.testclient import TestClient

    from bench.serve_workload import make_workload
    from bench.vllm_osprey_check import Report, api_checks
    from serve.app import create_app
    from serve.config import ServeConfig

    report = Report(str(tmp_path))
    app = create_app(ServeConfig(model=str(tiny_model_dir), max_regions=64))
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            assert app.state.engine.load_error is None
        api_checks(client, make_workload(1, 3, 1, seed=7).clients[0][0], report)
    steps = json.loads(report.path.read_text())["steps"]
    assert [steps[s]["status"] for s in ("describe", "chat", "chat_stream", "bad_request")] == [200, 200, 200, 400]
    assert len(steps["describe"]["body"]["results"]) == 3
    assert steps["chat_stream"]["last"][-1] == "data: [DONE]"


def test_the_checks_teacher_forcing_tells_the_reference_choice_from_another(tiny_pipeline):
    """bench/vllm_osprey_check.py's step (5) on CPU in fp32: our engine's greedy tokens, fed back through transformers'
    forward, are its top-1 at every step; a row with one token swapped for another is not, by a positive gap."""
    from bench.serve_workload import make_workload
    from bench.vllm_osprey_check import reference_tokens, teacher_forced

    prompts, ours = reference_tokens(tiny_pipeline, make_workload(2, 2, 1, seed=7), 6)
    same = teacher_forced(tiny_pipeline, prompts, ours)
    assert same["steps"] == 4 * 6 and same["top1_share"] == 1.0 and same["max_gap_below_top1"] == 0.0
    swapped = [row[:2] + [(row[2] + 1) % tiny_pipeline.config.vocab_size] + row[3:] for row in ours]
    other = teacher_forced(tiny_pipeline, prompts, swapped)
    assert other["below_top1_steps"] >= 4 and other["median_gap_below_top1"] > 0
