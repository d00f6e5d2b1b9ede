"""Ranking evaluation: loss and AUC over the real candidates only, one-class tasks said aloud.

A stand-in model returns given logits and labels for each batch (and, like the real one, a
loss over every candidate, padding included); the loader is a list of such batches. The
evaluation all-reduces its sums, so a one-process gloo group is opened in this process.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hstu.args import RankingArgs
from hstu.model.ranking import ranking_loss
from hstu.training.evaluate import evaluate


class _Batch(SimpleNamespace):
    def to(self, device):
        return self


def _batch(num_candidates, sample_mask, logits, labels) -> _Batch:
    return _Batch(
        num_candidates=torch.tensor(num_candidates),
        sample_mask=torch.tensor(sample_mask),
        logits=torch.tensor(logits, dtype=torch.float32),
        labels=torch.tensor(labels),
    )


class _Loader(list):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class _Model(torch.nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks

    def prepare(self, batch):  # the input stage (no dynamic tables here)
        return batch

    def forward(self, batch):
        loss = ranking_loss(batch.logits, batch.labels, self.num_tasks)  # padding counted
        return loss, (batch.logits, batch.labels)


def _run(batches, arch, num_tasks, is_main=True):
    cfg = SimpleNamespace(
        task="ranking", ranking=RankingArgs(prediction_head_arch=arch, num_tasks=num_tasks)
    )
    env = SimpleNamespace(device=torch.device("cpu"), is_main=is_main, backend="gloo")
    return evaluate(_Model(num_tasks), _Loader(batches), cfg, env, None)


def _real(batches):
    keep = [torch.repeat_interleave(b.sample_mask, b.num_candidates) for b in batches]
    return (
        torch.cat([b.logits[k] for b, k in zip(batches, keep)]),
        torch.cat([b.labels[k] for b, k in zip(batches, keep)]),
    )


@pytest.mark.parametrize("arch, num_tasks", [([8, 2], 2), ([8, 3], 1)], ids=["bce", "ce"])
def test_eval_loss_leaves_padding_candidates_out(one_process_group, arch, num_tasks):
    width = arch[-1]
    batches = [
        # samples of 2, 1 and 2 candidates; the last sample is padding, confidently wrong
        _batch([2, 1, 2], [True, True, False],
               [[0.5, -1.0, 0.2][:width], [1.0, 0.3, -0.4][:width], [-0.2, 0.8, 1.5][:width],
                [-30.0, -30.0, 30.0][:width], [-30.0, 30.0, -30.0][:width]],
               [2, 1, 0, 3 % width, 0]),
        _batch([1, 1], [True, True],
               [[0.1, 0.4, -0.6][:width], [-0.7, 0.2, 0.9][:width]], [1, 2]),
        _batch([2], [False], [[30.0, 30.0, 30.0][:width]] * 2, [0, 0]),  # padding only
    ]
    logits, labels = _real(batches)
    want = ranking_loss(logits, labels, num_tasks).item()
    got = _run(batches, arch, num_tasks)["loss"]
    assert got == pytest.approx(want, rel=1e-6)
    assert want < 10  # the padding's losses (about 30 each) would show


def _two_task_batches(task1_bits):
    """Task 0 has both classes; task 1's bits among the real candidates are task1_bits
    (the padding candidate carries the other class of task 1, which must not count)."""
    labels = [b << 1 | t0 for b, t0 in zip(task1_bits, [0, 1, 1, 0])]
    logits = [[0.1, 0.0], [0.9, 0.1], [0.4, -0.2], [-0.3, 0.3]]
    return [
        _batch([2, 2], [True, True], logits, labels),
        _batch([1], [False], [[0.0, 0.0]], [2 if task1_bits[0] == 0 else 0]),
    ]


def test_a_one_class_task_is_left_out_of_the_mean_auc_with_one_line(one_process_group, capsys):
    out = _run(_two_task_batches([0, 0, 0, 0]), [8, 2], 2)
    assert math.isnan(out["AUC/task1"]) and out["AUC"] == out["AUC/task0"] == 1.0
    assert capsys.readouterr().out.splitlines() == [
        "[hstu] AUC/task1: only one class among 4 evaluation candidates; left out of the mean AUC"
    ]
    _run(_two_task_batches([0, 0, 0, 0]), [8, 2], 2, is_main=False)  # rank 0 only
    _run(_two_task_batches([0, 1, 0, 1]), [8, 2], 2)  # both classes: nothing to say
    assert capsys.readouterr().out == ""


def test_one_task_or_every_task_with_one_class_says_the_auc_is_nan(one_process_group, capsys):
    one_task = [_batch([3], [True], [[0.2], [0.5], [-0.1]], [0, 0, 0])]
    assert math.isnan(_run(one_task, [8, 1], 1)["AUC"])
    every_task = [_batch([2], [True], [[0.2, 0.1], [0.5, 0.3]], [0, 0])]
    assert math.isnan(_run(every_task, [8, 2], 2)["AUC"])
    assert capsys.readouterr().out.splitlines() == [
        "[hstu] AUC: only one class among 3 evaluation candidates; AUC is NaN",
        (
            "[hstu] AUC/task0, AUC/task1: only one class among 2 evaluation candidates; left out "
            "of the mean AUC (no task left: AUC is NaN)"
        ),
    ]
