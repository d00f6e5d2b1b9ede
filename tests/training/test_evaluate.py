"""Ranking evaluation: the loss over the real candidates only.

A stand-in model returns given logits and labels for each batch (and, like the real one, a
loss over every candidate, padding included); the loader is a list of such batches. The
evaluation all-reduces its sums, so a one-process gloo group is opened in this process.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from hstu.args import RankingArgs
from hstu.model.ranking import ranking_loss
from hstu.training.evaluate import evaluate


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


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
