"""`guardloop train --average-of N`: the student is the weight average of N fine-tunes from one start.

Real fine-tuning on tests/tiny_bert.py's tiny BERT (the student's real tokenizer), real torch state dicts.
"""

from __future__ import annotations

import pytest
import torch
from guardloop.trainer.averaging import average_state_dicts, fine_tune_averaged, member_configs
from guardloop.trainer.finetune import FineTuneConfig, TrainingExample, fine_tune

from guardloop.core.labels import LABELS
from tests.tiny_bert import write_tiny_bert

TEXTS = {
    "self-harm": "i keep thinking about hurting myself tonight",
    "medical-advice": "what dose of ibuprofen is safe for a fever",
    "legal-advice": "can my landlord keep my deposit after i moved out",
    "financial-advice": "should i pay off my card or invest in an index fund",
    "emergency-situation": "the river is flooding our street what do we do now",
    "not-harmful": "what is a good recipe for banana bread",
}
TRAIN = [TrainingExample(f"{text} {i}", label) for label, text in TEXTS.items() for i in range(4)]
DEV = [(text, label) for label, text in TEXTS.items()]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_members_share_the_start_and_differ_in_order_and_the_first_is_the_plain_run():
    configs = member_configs(FineTuneConfig(seed=13), 3)
    assert [c.seed for c in configs] == [13, 13, 13]
    assert [c.order_seed for c in configs] == [13, 14, 15]
    with pytest.raises(ValueError, match="at least 1"):
        member_configs(FineTuneConfig(), 0)


def test_floating_weights_are_averaged_and_integer_buffers_kept():
    states = [
        {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])},
        {"w": torch.tensor([3.0, 6.0]), "ids": torch.tensor([0, 1])},
    ]
    averaged = average_state_dicts(states)
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["ids"].dtype == torch.int64 and torch.equal(averaged["ids"], torch.tensor([0, 1]))


def test_the_averaged_student_is_the_mean_of_its_members_weights(tiny_dir):
    config = FineTuneConfig(seed=5, epochs=2, batch_size=4, learning_rate=1e-3, patience=5)
    members = [fine_tune(tiny_dir, TRAIN, DEV, member, progress=False) for member in member_configs(config, 2)]
    averaged = fine_tune_averaged(tiny_dir, TRAIN, DEV, config, 2, progress=False)

    first, second = (m.model.state_dict() for m in members)
    # Different data orders give different members, from the same head initialization.
    key = "classifier.weight"
    assert not torch.allclose(first[key], second[key])
    for name, tensor in averaged.model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=1e-5, atol=1e-6)
    # The average is judged on dev itself, and the card can say which members it holds.
    assert averaged.dev_report is not None and set(averaged.dev_report["per_class_f1"]) >= set(LABELS)
    assert [m["order_seed"] for m in averaged.config["averaged_members"]] == [5, 6]


def test_one_member_is_the_plain_fine_tune(tiny_dir):
    config = FineTuneConfig(seed=5, epochs=1, batch_size=4, learning_rate=1e-3)
    plain = fine_tune(tiny_dir, TRAIN, DEV, config, progress=False).model.state_dict()
    single = fine_tune_averaged(tiny_dir, TRAIN, DEV, config, 1, progress=False).model.state_dict()
    for name, tensor in plain.items():
        assert torch.equal(tensor, single[name])
