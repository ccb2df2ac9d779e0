"""Training config validation, the DeepSpeed config builder, the resumable sampler and the stage table
(no DeepSpeed engine needed: fast)."""

from __future__ import annotations

import json
import re

import pytest

from train.config import CONFIG_DIR, load_config, parse_override
from train.deepspeed_utils import build_ds_config, load_template
from train.sampler import ResumableSampler
from train.trainable import STAGE_PARTS, trainable_parts

BASE = {"stage": 3, "model": "tiny", "output_dir": "/tmp/x"}


def test_shipped_configs_parse_with_official_hyper_parameters():
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"osprey7b_stage1", "osprey7b_stage2", "osprey7b_stage3", "tiny_stage1", "tiny_stage2", "tiny_stage3"} <= set(shipped)
    for name in shipped:
        cfg = load_config(name)
        assert cfg.stage == int(re.search(r"stage(\d)", name).group(1))
        assert (CONFIG_DIR / f"{name}.yaml").read_text().startswith("#")  # header comment = launch command
    for stage, lr, epochs in ((1, 1e-3, 1), (2, 2e-5, 2), (3, 1e-5, 2)):
        cfg = load_config(f"osprey7b_stage{stage}")
        assert (cfg.optim.lr, cfg.epochs, cfg.micro_batch_size, cfg.global_batch_size) == (lr, epochs, 1, 4)
        assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0
        assert cfg.optim.warmup_ratio == 0.03 and cfg.bf16 and cfg.tf32 and cfg.gradient_checkpointing
        assert cfg.data.max_length == 2048 and cfg.deepspeed == "zero2" and not cfg.train_vision


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "learning_rate": 1e-5}, r"unknown config keys: \['learning_rate'\]"),
    ({**BASE, "optim": {"lr": 1e-5, "beta": 0.9}}, r"unknown config keys: \['optim.beta'\]"),
    ({**BASE, "lora": {"rank": 8}}, r"lora.rank"),
    ({**BASE, "stage": 4}, "stage must be one of"),
    ({"stage": 3, "model": "tiny"}, r"missing required config keys: \['output_dir'\]"),
    ({**BASE, "stage": 2, "lora": {"r": 8}}, "lora is only supported in stage 3"),
    ({**BASE, "micro_batch_size": 3, "global_batch_size": 4}, "not a multiple"),
    ({**BASE, "optim": {"lr": -1.0}}, "lr=-1.0"),
    ({**BASE, "optim": {"optimizer": "sgd"}}, "'sgd'"),
    ({**BASE, "data": {"files": ["a.json"], "subsets": ["b"]}}, "not both"),
    ({**BASE, "data": {"files": [{"kind": "detailed"}]}}, "path or {path, kind, repeat}"),
    ({**BASE, "data": {"files": [{"path": "a.json", "weight": 2}]}}, "path or {path, kind, repeat}"),
    ({**BASE, "data": {"files": [{"path": "a.json", "repeat": 0}]}}, "repeat must be an integer >= 1"),
    ({**BASE, "data": {"files": [{"path": "a.json", "repeat": 1.5}]}}, "repeat must be an integer >= 1"),
    ({**BASE, "max_steps": 0}, "max_steps"),
    ({**BASE, "data": [1, 2]}, "data must be a mapping"),
])
def test_invalid_configs_name_the_problem(raw, message):
    with pytest.raises(ValueError, match=message):
        load_config(raw=raw)


def test_overrides_are_validated_like_the_file():
    cfg = load_config(raw=BASE, overrides=[parse_override("optim.lr=2e-4"), parse_override("data.max_length=512")])
    assert cfg.optim.lr == 2e-4 and cfg.data.max_length == 512
    with pytest.raises(ValueError, match="optim.lrr"):
        load_config(raw=BASE, overrides=[parse_override("optim.lrr=1")])
    with pytest.raises(ValueError, match="key.path=value"):
        parse_override("optim.lr")


def test_unknown_shipped_config_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="tiny_stage1"):
        load_config("no_such_config")


def test_deepspeed_config_is_filled_from_the_yaml(tmp_path):
    cfg = load_config(raw={**BASE, "micro_batch_size": 2, "global_batch_size": 16, "deepspeed": "zero3"})
    ds = build_ds_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 16)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert ds["zero_allow_untested_optimizer"] is True
    for name in ("zero2", "zero3", "zero3_offload"):
        text = (CONFIG_DIR / f"{name}.json").read_text()
        assert '"auto"' not in text
    z2 = load_template("zero2")["zero_optimization"]
    assert z2["overlap_comm"] and z2["contiguous_gradients"]
    assert load_template("zero3_offload")["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError, match="global_batch_size 16 is not divisible"):
        build_ds_config(cfg, world_size=3)
    bad = tmp_path / "auto.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        load_template(str(bad))
    bad.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ValueError, match="train_batch_size"):
        load_template(str(bad))


def test_stage_table_matches_the_spec():
    assert STAGE_PARTS == {1: ("mm_projector",), 2: ("mask_extractor",),
                           3: ("language_model", "mm_projector", "mask_extractor")}
    assert "vision_tower" in trainable_parts(2, train_vision=True)
    with pytest.raises(ValueError, match="unknown stage 5"):
        trainable_parts(5)


def test_sampler_is_deterministic_resumable_and_partitions_ranks():
    lengths = [5, 90, 7, 60, 3, 80, 10, 70, 2, 95, 11]
    a = ResumableSampler(lengths, micro_batch_size=2, seed=3)
    b = ResumableSampler(lengths, micro_batch_size=2, seed=3)
    a.set_epoch(1)
    b.set_epoch(1, start=4)
    assert list(a)[4:] == list(b) and len(b) == len(list(a)) - 4
    a.set_epoch(2)
    assert list(a) != list(ResumableSampler(lengths, micro_batch_size=2, seed=3))  # epochs differ
    ranks = [ResumableSampler(lengths, micro_batch_size=2, world_size=2, rank=r, seed=0) for r in (0, 1)]
    orders = [list(s) for s in ranks]
    assert len(orders[0]) == len(orders[1]) == ranks[0].samples_per_rank == 6
    assert set(orders[0]) | set(orders[1]) == set(range(len(lengths)))  # every sample, padded by wrapping
    # grouped: each global batch (2 ranks x 2) holds similar lengths, longest first within a mega-batch
    grouped = ResumableSampler(lengths, micro_batch_size=2, world_size=2, seed=0, mega_factor=100).global_order(0)
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    expected = [sorted(by_length[k:k + 4]) for k in range(0, 8, 4)]
    batches = [sorted(grouped[k:k + 4]) for k in range(0, 12, 4)]
    assert all(b in batches for b in expected)


def test_values_are_type_checked_and_yaml_exponents_accepted():
    cfg = load_config(raw={**BASE, "optim": {"lr": "2e-5"}, "epochs": 2})
    assert cfg.optim.lr == 2e-5 and cfg.epochs == 2.0
    with pytest.raises(ValueError, match="config key micro_batch_size must be int, got str"):
        load_config(raw={**BASE, "micro_batch_size": "two"})
    with pytest.raises(ValueError, match="config key bf16 must be bool"):
        load_config(raw={**BASE, "bf16": "yes please"})


def test_train_package_exports_match_its_lazy_table():
    import train

    assert set(train.__all__) == set(train._EXPORTS)
    assert all(getattr(train, name) is not None for name in train.__all__)
