"""One student from several: fine-tune it N times from the same start, then average the weights (a "model soup").

Members share the base weights and the head's initialization (FineTuneConfig.seed) and differ in data order and
dropout (order_seed = seed, seed + 1, ...), so they stay in one basin of the loss and their average is a model of
the same size and speed, usually better than a typical member (Wortsman et al., 2022, "Model soups"). On small,
noisy training sets a single fine-tune's score moves by points from seed to seed; the average moves less. The
cost is N trainings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from guardloop.trainer.finetune import FineTuneConfig, FineTuneResult, TrainingExample, dev_report, fine_tune


def member_configs(config: FineTuneConfig, members: int) -> list[FineTuneConfig]:
    """The members' configs: the same start (`seed`), data orders seed, seed + 1, ...; the first is the plain run."""
    if members < 1:
        raise ValueError(f"members must be at least 1, got {members}")
    return [replace(config, order_seed=config.seed + i) for i in range(members)]


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors; other tensors (position ids, counters) from the first."""
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = torch.stack([state[key].float() for state in states]).mean(dim=0).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


def fine_tune_averaged(
    base_dir: Path,
    train: Sequence[TrainingExample],
    dev: Sequence[tuple[str, str]] | None,
    config: FineTuneConfig,
    members: int,
    *,
    progress: bool = True,
) -> FineTuneResult:
    """Fine-tune `members` times (each with its own early stopping on `dev`) and return the weight average."""
    started = time.perf_counter()
    results = [fine_tune(base_dir, train, dev, member, progress=progress) for member in member_configs(config, members)]
    model = results[0].model
    model.load_state_dict(average_state_dicts([result.model.state_dict() for result in results]))
    model.eval()
    members_info = [
        {
            "order_seed": result.config["order_seed"],
            "best_epoch": result.best_epoch,
            "dev_macro_f1": None if result.dev_report is None else result.dev_report["macro_f1"],
        }
        for result in results
    ]
    return FineTuneResult(
        model=model,
        tokenizer=results[0].tokenizer,
        best_epoch=results[0].best_epoch,
        dev_report=dev_report(model, results[0].tokenizer, dev, config.max_seq_len) if dev else None,
        history=[entry | {"member": i} for i, result in enumerate(results) for entry in result.history],
        seconds=time.perf_counter() - started,
        config=asdict(config) | {"averaged_members": members_info},
    )
