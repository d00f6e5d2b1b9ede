"""TrainerArgs.max_train_epochs / eval_interval_epochs: a run's length and its evaluations in
epochs of the training split."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from types import SimpleNamespace

import pytest

from hstu.training.budget import run_length
from tests.training.test_e2e import losses, run_job


def _args(**kw) -> SimpleNamespace:
    base = {"max_train_iters": None, "max_train_epochs": None, "eval_interval": 100,
            "eval_interval_epochs": None}
    return SimpleNamespace(**{**base, **kw})


def test_epochs_become_the_fewest_whole_steps_that_cover_them() -> None:
    for per_epoch in (1, 3, 7, 8, 30, 128, 1001):
        for epochs in (0.1, 0.3, 0.5, 1, 1.5, 2.5, 3, 7.7, 10, 130, 200):
            total, interval = run_length(_args(max_train_epochs=epochs), per_epoch)
            exact = Fraction(str(epochs)) * per_epoch  # the decimal the user wrote, exactly
            assert total == max(1, math.ceil(exact)), (epochs, per_epoch)
            assert interval == 100  # eval_interval unchanged


def test_evaluation_interval_in_epochs_is_the_nearest_whole_step() -> None:
    for per_epoch in (1, 3, 8, 30, 128):
        for share in (0.05, 0.25, 0.5, 1, 2):
            _, interval = run_length(_args(eval_interval_epochs=share), per_epoch)
            exact = Fraction(str(share)) * per_epoch
            assert interval >= 1
            assert abs(interval - exact) <= Fraction(1, 2) or (exact < 1 and interval == 1)


def test_steps_and_the_default_length_are_unchanged() -> None:
    assert run_length(_args(max_train_iters=17, eval_interval=5), 8) == (17, 5)
    assert run_length(_args(), 8) == (8, 100)  # one epoch


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("length")


@pytest.mark.slow  # the default tier trains in epochs through configs/cpu_retrieval.gin (test_own_data_recipe.py)
def test_a_run_in_epochs_trains_and_evaluates_where_the_epochs_say(tmp) -> None:
    params = [
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=None",
        "TrainerArgs.max_train_epochs=1.5",
        "TrainerArgs.eval_interval_epochs=0.5", 'OptimizerArgs.lr_decay_style="linear"',
        "OptimizerArgs.min_learning_rate=0.0", "OptimizerArgs.lr_warmup_iters=0",
    ]
    run = run_job(tmp, "epochs", params=params, timeout=240)
    per_epoch = int(re.search(r"(\d+) steps/epoch", run["out"]).group(1))
    assert per_epoch >= 4  # (the split must make 0.5 epoch more than one step)
    total = math.ceil(1.5 * per_epoch)
    interval = round(0.5 * per_epoch)
    assert (f"[hstu] run length: 1.5 epochs = {total} steps; an evaluation every 0.5 epoch = "
            f"{interval} steps ({per_epoch} steps an epoch)") in run["out"]
    loss = losses(run["metrics"])
    assert sorted(loss) == list(range(1, total + 1))  # every step, and none past the length
    evaluated = sorted({int(r["step"]) for r in run["metrics"] if r["split"] == "eval"})
    assert evaluated == sorted({*range(interval, total + 1, interval), total})
    lr = {int(r["step"]): float(r["value"]) for r in run["metrics"]
          if r["split"] == "train" and r["name"] == "lr"}
    assert lr[total] == pytest.approx(0.0, abs=1e-12)  # the schedule ends with the epochs

