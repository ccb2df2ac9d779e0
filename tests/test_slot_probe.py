"""`bench.slot_probe`: the probes read the right positions and labels, and score held-out records."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.region_eval import RENUMBER_SEED, question_type, renumbered, split_records, teacher_forced_turns
from bench.slot_probe import ProbeRow, probe_accuracies, probe_rows
from osprey.data.records import record_masks
from osprey.data.samples import build_sample

FIXTURE = Path(__file__).parent / "fixtures" / "synth"


def test_rows_sit_at_the_slots_and_carry_their_regions_labels(tiny_pipeline):
    """Layer 0 at a slot's `<mask>` / `<pos>` is that region's mask / position token (renumbered order); every
    colour question's `asked_color@answer` row carries the question's own answer."""
    rows = probe_rows(tiny_pipeline, FIXTURE, "train", 2, "color")
    records = list(split_records(FIXTURE, "train", "stage3_short_form", 2))
    copies = [renumbered(r, np.random.default_rng(RENUMBER_SEED)) for r in records[:1]]
    encoded = tiny_pipeline.encode_image(FIXTURE / copies[0].file_name)
    mask_tokens, pos_tokens = tiny_pipeline.region_tokens(encoded, record_masks(copies[0]))
    first = [r for r in rows["number@mask"] if r.record == 0]
    assert [r.label for r in first] == [str(k) for k in range(1, len(copies[0].annotation) + 1)]
    layers = tiny_pipeline.model.language_model.config.num_hidden_layers + 1
    assert all(len(r.states) == layers for found in rows.values() for r in found)
    for k, row in enumerate(first):
        torch.testing.assert_close(row.states[0], mask_tokens[k].float().cpu(), rtol=1e-2, atol=1e-2)
        pos_row = [r for r in rows["number@pos"] if r.record == 0][k]
        torch.testing.assert_close(pos_row.states[0], pos_tokens[k].float().cpu(), rtol=1e-2, atol=1e-2)
    assert len(rows["number@mask"]) == sum(len(r.annotation) for r in records)

    rng, order = np.random.default_rng(0), np.random.default_rng(RENUMBER_SEED)
    expected = []
    for record in records:
        copy = renumbered(record, order)
        sample = build_sample(copy, 3, "short_form", FIXTURE, rng)
        encoded = tiny_pipeline.encode_image(FIXTURE / copy.file_name)
        expected += [(question_type(t.question), t.truth.strip().lower())
                     for t in teacher_forced_turns(tiny_pipeline, encoded, copy, sample) if t.named]
    labels = [r.label for r in rows["asked_color@answer"]]
    assert labels == [truth for kind, truth in expected if kind == "colour"] and labels
    assert len(rows["asked_number@answer"]) == len(expected) > len(labels)


def test_probe_accuracy_is_scored_on_held_out_records():
    """A label written into one coordinate of layer 1 is read there (on records the probe was not fitted on) and
    not from layer 0's noise; too few records to split is an error."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for record in range(20):
        for label in ("red", "blue", "green"):
            noise = torch.randn(2, 8, generator=generator)
            signal = noise[1].clone()
            signal[0] = 5.0 * ("red", "blue", "green").index(label)
            rows.append(ProbeRow(record, [noise[0], signal], label))
    result = probe_accuracies(rows, 0.7)
    assert (result["n_train"], result["n_test"]) == (42, 18)
    assert result["accuracy_by_layer"][1] == 1.0 and result["accuracy_by_layer"][0] < 0.8
    assert result["majority"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="too few records"):
        probe_accuracies([ProbeRow(0, [torch.zeros(2)], "a")], 0.7)


def test_category_rows_need_no_referring_expressions(tiny_pipeline):
    """--label category: each slot's row carries its region's category name (renumbered order)."""
    rows = probe_rows(tiny_pipeline, FIXTURE, "train", 2, "category")
    records = list(split_records(FIXTURE, "train", "stage3_short_form", 2))
    order = np.random.default_rng(RENUMBER_SEED)
    names = [a.category_name for r in records for a in renumbered(r, order).annotation]
    assert [r.label for r in rows["category@mask"]] == names
