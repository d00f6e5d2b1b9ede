"""Cold items (DatasetArgs.cold_items, docs/data.md "Cold items"): no training sample holds a
held-out item, the evaluation targets are those of a run without the option, and the
evaluation adds the metrics of the cold targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hstu.args import ConfigError, DatasetArgs
from hstu.data import build_data
from hstu.data.cold import draw_cold_items, hold_out_items
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore
from hstu.model import retrieval_metrics
from hstu.training.evaluate import ColdTargets


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synth")
    preprocess("synthetic", out=out,
               synthetic=SyntheticDataArgs(num_users=120, num_items=50, min_length=3,
                                           max_length=30),
               verbose=False)
    return str(out / "synthetic")


def _args(path: str, cold: float, holdout: bool = True) -> DatasetArgs:
    return DatasetArgs(dataset_name="synthetic", max_sequence_length=8, dataset_path=path,
                       holdout_validation=holdout, cold_items=cold)


def test_the_cold_items_are_a_share_of_the_catalogue_fixed_by_their_seed():
    a = draw_cold_items(1, 1683, 0.1, 0)
    assert len(a) == 168 and a.min() >= 1 and a.max() < 1683 and (np.diff(a) > 0).all()
    assert np.array_equal(a, draw_cold_items(1, 1683, 0.1, 0))
    assert not np.array_equal(a, draw_cold_items(1, 1683, 0.1, 1))
    assert len(draw_cold_items(1, 1683, 0.0, 0)) == 0


def test_holding_out_drops_cold_events_but_the_last_ones():
    # users: [1 5 2 5 3], [5 5], [4 6 5 1] ; cold {5, 6}; the last 2 of each stay
    items = np.array([1, 5, 2, 5, 3, 5, 5, 4, 6, 5, 1])
    store = SequenceStore(offsets=np.array([0, 5, 7, 11]), items=items,
                          timestamps=np.arange(11) * 10, actions=items % 3,
                          contextual={}, metadata={})
    out, dropped = hold_out_items(store, np.array([5, 6]), keep_last=2)
    seqs = [out.items[a:b].tolist() for a, b in zip(out.offsets[:-1], out.offsets[1:])]
    assert seqs == [[1, 2, 5, 3], [5, 5], [4, 5, 1]] and dropped == 2
    assert out.timestamps.tolist() == [0, 20, 30, 40, 50, 60, 70, 90, 100]
    assert out.actions.tolist() == [1, 2, 2, 0, 2, 2, 1, 2, 1]


@pytest.mark.parametrize("holdout", [True, False])
def test_no_training_sample_holds_a_cold_item_and_the_targets_stay(synth, holdout):
    store = SequenceStore.load(synth)
    share = 0.2
    plain_train, plain_eval, _ = build_data(_args(synth, 0.0, holdout), "retrieval", 16, 16, 0,
                                            1, 0, holdout_validation=holdout)
    train, ev, info = build_data(_args(synth, share, holdout), "retrieval", 16, 16, 0, 1, 0,
                                 holdout_validation=holdout)
    cold = ev.cold_items
    assert len(cold) == round(share * (info.num_items - info.first_item_id))
    held = set(cold.tolist())
    seen_train = set()
    for batch in train:
        seen_train |= set(batch.features[batch.item_feature_name].values().tolist())
    assert seen_train and not seen_train & held
    # the same targets, user for user, as without the option; some of them cold
    targets = torch.cat([b.labels for b in ev]).tolist()
    assert targets == torch.cat([b.labels for b in plain_eval]).tolist()
    assert set(targets) & held
    # with the option off, training sees those items
    plain_seen = set()
    for batch in plain_train:
        plain_seen |= set(batch.features[batch.item_feature_name].values().tolist())
    assert plain_seen & held
    assert store.num_users == info.num_users


def test_cold_items_are_refused_for_ranking_and_out_of_range(synth):
    with pytest.raises(ConfigError, match="cold_items"):
        _args(synth, 1.0)
    args = DatasetArgs(dataset_name="synthetic", max_sequence_length=8, dataset_path=synth,
                       max_num_candidates=2, cold_items=0.1)
    with pytest.raises(ConfigError, match="cold_items.*ranking"):
        build_data(args, "ranking", 16, 16, 0, 1, 0)


def test_cold_metrics_are_the_metrics_of_the_cold_targets(plain_process):
    class Loader:
        cold_items = np.array([3, 7])

    names = ["HR@10", "NDCG@10"]
    ranks = torch.tensor([1.0, 20.0, 3.0, float("inf"), 2.0])
    targets = torch.tensor([3, 4, 7, 7, 9])
    cold = ColdTargets(Loader(), names)
    cold.update(ranks[:2], targets[:2])
    cold.update(ranks[2:], targets[2:])
    out = cold.compute()
    want = retrieval_metrics(torch.tensor([1.0, 3.0, float("inf")]), names)
    assert out["cold/events"] == 3.0
    for n in names:
        assert out[f"cold/{n}"] == pytest.approx(float(want[n].mean()))
    assert out["cold/HR@10"] == pytest.approx(2 / 3)

    class Warm:
        cold_items = None

    none = ColdTargets(Warm(), names)
    none.update(ranks, targets)
    assert none.compute() == {}


@pytest.mark.slow  # a 2-process run of the debug preset: ~25 s
def test_a_retrieval_run_writes_the_cold_metrics(tmp_path):
    """Through the trainer (2 processes): metrics.csv holds cold/<metric> and cold/events
    beside every metric, cold/events the number of evaluation targets that are cold."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.training.test_e2e import _env, evals, read_metrics

    root = Path(__file__).resolve().parents[2]
    run_dir, data = tmp_path / "run", tmp_path / "synthetic"  # written by the run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "pretrain_gr_retrieval.py"), "--gin-config-file",
           str(root / "configs" / "debug_retrieval.gin")]
    for p in (f'DatasetArgs.dataset_path="{data}"', f'TrainerArgs.run_dir="{run_dir}"',
              "DatasetArgs.cold_items=0.2", "TrainerArgs.max_eval_iters=None"):
        cmd += ["--gin-param", p]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = evals(read_metrics(run_dir))
    _, ev, info = build_data(_args(str(data), 0.2, holdout=False), "retrieval", 16, 16, 0, 1, 0)
    items = info.num_items - info.first_item_id
    assert (f"[hstu] cold items: {round(0.2 * items)} of {items} items held out of training "
            f"(DatasetArgs.cold_items): {info.cold_events_dropped} events dropped"
            in proc.stdout + proc.stderr)
    assert info.cold_events_dropped > 0
    cold = torch.isin(torch.cat([b.labels for b in ev]), torch.from_numpy(ev.cold_items))
    assert got["cold/events"] == float(cold.sum()) > 0
    for name in ("HR@10", "NDCG@10", "MRR"):
        assert 0.0 <= got[f"cold/{name}"] <= 1.0 and name in got
