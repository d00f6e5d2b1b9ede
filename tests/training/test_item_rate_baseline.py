"""Ranking's per-item baseline (hstu.training.evaluate.item_rate_baseline): every evaluation
candidate scored with its item's training label rate, against a reference written here from
the raw rows (the protocol's splits, the shrinkage, a rank-sum AUC), on real loaders."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hstu.args import DatasetArgs, RankingArgs
from hstu.data import build_data
from hstu.data.data_args import CustomDataArgs
from hstu.data.preprocess import preprocess
from hstu.training import evaluate
from hstu.training.evaluate import ITEM_RATE_PSEUDO_LABELS, item_rate_baseline

CANDIDATES = 3



def _log(tmp_path, num_classes: int):
    """40 users x 14 interactions over 30 items; an item's label is mostly its own (item % K),
    so an item's training rate predicts it. Returns (raw rows, the processed folder)."""
    rng = np.random.default_rng(3)
    rows = []
    for user in range(40):
        for k in range(14):
            item = int(rng.integers(1, 31))
            label = item % num_classes if rng.random() < 0.75 else int(rng.integers(0, num_classes))
            rows.append((user, item, label, 1000 * user + k))
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,label,timestamp\n"
                    + "".join(f"{u},{i},{a},{t}\n" for u, i, a, t in rows))  # fmt: skip
    preprocess("custom", None, tmp_path, custom=CustomDataArgs(path=str(path), action_column="label"),
               verbose=False, output_name="log")  # fmt: skip
    return rows, tmp_path / "log"


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC, ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    equal = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * equal) / (len(pos) * len(neg)))


def _reference(rows, num_classes: int, bce: bool) -> float:
    """Per user (time order): the last C are the test candidates, the C before them the
    validation ones, everything earlier is training (histories here fit max_sequence_length)."""
    per_user = defaultdict(list)
    for user, item, label, time in sorted(rows, key=lambda r: (r[0], r[3])):
        per_user[user].append((item, label))
    train, test = [], []
    for seq in per_user.values():
        train += seq[: -2 * CANDIDATES]
        test += seq[-CANDIDATES:]
    m = ITEM_RATE_PSEUDO_LABELS
    labels = np.array([a for _, a in test])
    if bce:  # one task per bit; the mean over the tasks with both classes
        aucs = []
        for bit in range(num_classes.bit_length()):
            prior = np.mean([(a >> bit) & 1 for _, a in train])
            hits, seen = defaultdict(float), defaultdict(int)
            for item, a in train:
                hits[item] += (a >> bit) & 1
                seen[item] += 1
            score = np.array([(hits[i] + m * prior) / (seen[i] + m) for i, _ in test])
            positive = ((labels >> bit) & 1).astype(bool)
            if positive.any() and not positive.all():
                aucs.append(_rank_auc(score, positive))
        return float(np.mean(aucs))
    freq = np.bincount([a for _, a in train], minlength=num_classes) / len(train)
    counts = defaultdict(lambda: np.zeros(num_classes))
    for item, a in train:
        counts[item][a] += 1
    probs = np.array([(counts[i] + m * freq) / (counts[i].sum() + m) for i, _ in test])
    return float(np.mean([_rank_auc(probs[:, c], labels == c) for c in range(num_classes)]))


@pytest.mark.parametrize("head", ["classes", "tasks"])
def test_per_item_auc_matches_the_reference(tmp_path, one_process_group, head, monkeypatch):
    num_classes = 3
    rows, folder = _log(tmp_path, num_classes)
    args = DatasetArgs(dataset_name="log", dataset_path=str(folder), max_sequence_length=64,
                       max_num_candidates=CANDIDATES)  # fmt: skip
    train, test, _ = build_data(args, "ranking", 8, 8, 0, 1, 0, holdout_validation=True)
    # classes: a cross-entropy head over the 3 label values; tasks: labels 0..2 as bitmasks
    # of 2 binary tasks (bit 0: 1, bit 1: 2), one logit each
    arch, tasks = ([16, num_classes], 1) if head == "classes" else ([16, 2], 2)
    cfg = SimpleNamespace(task="ranking", ranking=RankingArgs(prediction_head_arch=arch, num_tasks=tasks))
    env = SimpleNamespace(device=torch.device("cpu"), is_main=True)
    got = item_rate_baseline(train, test, cfg, env, None)
    want = _reference(rows, num_classes, bce=head == "tasks")
    assert got is not None and got["AUC"] == pytest.approx(want, abs=1e-6)
    assert got["AUC"] > 0.6  # informative here, where the label prior's AUC is 0.5
    assert np.isfinite(got["loss"])
    # one evaluation batch only: fewer candidates, another figure (max_iters is honoured)
    assert item_rate_baseline(train, test, cfg, env, 1)["AUC"] != got["AUC"]
    # the training labels counted in groups of a few rows: the same figures
    monkeypatch.setattr(evaluate, "_COUNT_BLOCK_ROWS", 7)
    assert item_rate_baseline(train, test, cfg, env, None) == got


def test_not_for_retrieval(tmp_path, one_process_group):
    _, folder = _log(tmp_path, 2)
    args = DatasetArgs(dataset_name="log", dataset_path=str(folder), max_sequence_length=64)
    train, test, _ = build_data(args, "retrieval", 8, 8, 0, 1, 0)
    cfg = SimpleNamespace(task="retrieval", ranking=RankingArgs(prediction_head_arch=[16, 2]))
    assert item_rate_baseline(train, test, cfg, SimpleNamespace(is_main=True), None) is None
