"""TrainerArgs.best_within_stderr in a real (tiny) two-process retrieval run: the selected
checkpoint is the latest validation evaluation within one standard error of the highest value
so far (the standard errors all-reduced over both ranks' users and written to metrics.csv),
the log says so, and the test split is scored with that checkpoint."""

from __future__ import annotations

import csv
import os

import torch

from tests.dist_utils import run_multiprocess
from tests.training.helpers import debug_trainer


def _run(rank: int, world_size: int, tmp: str) -> None:
    trainer = debug_trainer(
        "retrieval", tmp, os.path.join(tmp, "run"),
        [
            "SyntheticDataArgs.num_users=96", "DatasetArgs.holdout_validation=True",
            'TrainerArgs.best_metric="NDCG@10"', "TrainerArgs.best_within_stderr=1.0",
            "TrainerArgs.max_train_iters=24", "TrainerArgs.eval_interval=2",
            "TrainerArgs.max_eval_iters=None", "TrainerArgs.log_interval=24",
            "NetworkArgs.hidden_dropout=0.2", "OptimizerArgs.learning_rate=0.05",
            # a seed whose curve has a later step within one standard error of its peak (the
            # rule matters there; the curve follows the dropout masks: checked below)
            "TrainerArgs.seed=2",
        ],
    )
    try:
        printed: list[str] = []
        shown = trainer.logger.print

        def record(message: str) -> None:
            printed.append(message)
            shown(message)

        trainer.logger.print = record
        trainer.train()
        if rank == 0:
            best = trainer.checkpoint.best
            torch.save({"step": best.step, "printed": printed}, os.path.join(tmp, "run.pt"))
    finally:
        trainer.close()


def _evals(run_dir: str) -> tuple[dict[int, tuple[float, float]], dict[str, float]]:
    """({step: (valid NDCG@10, its standard error)}, the rows logged with the test split)."""
    values: dict[int, dict[str, float]] = {}
    test: dict[str, float] = {}
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] != "eval":
                continue
            if row["name"] in ("NDCG@10", "stderr/NDCG@10"):
                values.setdefault(int(row["step"]), {})[row["name"]] = float(row["value"])
            elif row["name"].startswith(("test/", "best_")):
                test[row["name"]] = float(row["value"])
    return {s: (m["NDCG@10"], m["stderr/NDCG@10"]) for s, m in values.items()}, test


def test_selects_the_latest_evaluation_within_one_standard_error(tmp_path) -> None:
    tmp = str(tmp_path)
    run_multiprocess(_run, world_size=2, tmp=tmp)
    out = torch.load(os.path.join(tmp, "run.pt"))
    evals, test = _evals(os.path.join(tmp, "run"))
    assert sorted(evals) == list(range(2, 25, 2))
    # standard errors of a mean over the 96 validation users: positive where any user scores
    assert all((se > 0) == (value > 0) for value, se in evals.values()), evals
    # the rule, from the logged curve: the latest step whose value is within one standard
    # error (the peak's) of the highest value up to it
    top_step = max(evals, key=lambda s: (evals[s][0], -s))
    expected = None
    for step in sorted(evals):
        peak = max((s for s in evals if s <= step), key=lambda s: (evals[s][0], -s))
        if evals[step][0] >= evals[peak][0] - evals[peak][1]:
            expected = step
    assert out["step"] == expected, (out["step"], evals)
    # the run is one where the rule matters: the highest value alone picks another step,
    # and the selection is within one standard error of the final highest value
    assert expected != top_step and expected > top_step, (expected, top_step, evals)
    assert evals[expected][0] >= evals[top_step][0] - evals[top_step][1]
    # the test split is scored once, with the selected checkpoint, and the log says why
    assert test["best_step"] == expected and "test/NDCG@10" in test and "test/stderr/NDCG@10" in test
    printed = out["printed"]
    why = (
        f"[hstu] selected step {expected} (valid NDCG@10 {evals[expected][0]:.4f}): the "
        f"latest within 1 standard error ({evals[top_step][1]:.4f}) of the highest, "
        f"{evals[top_step][0]:.4f} at step {top_step}"
    )
    assert any(line.startswith(why) for line in printed), printed
    assert any(line.startswith(f"[hstu] test split, best checkpoint (step {expected},")
               for line in printed), printed
    # evaluations print each metric with its standard error
    assert any(line.startswith("valid @ step 2: HR@10 ") and " ±0." in line for line in printed)
    # the test split by the target's count in training: the groups partition the 96 users,
    # and their metrics, weighted by their users, are the split's
    groups = {name.split("/")[1] for name in test if name.startswith("test/seen_")}
    assert groups == {"seen_0-4", "seen_5-19", "seen_20-99", "seen_100+"}, sorted(test)
    events = {g: test[f"test/{g}/events"] for g in groups}
    assert sum(events.values()) == 96 and sum(n > 0 for n in events.values()) >= 2, events
    assert test["test/MRR"] > 0  # (a metric with something to weigh on this tiny run)
    for metric in ("HR@10", "NDCG@10", "MRR"):
        weighted = sum(test[f"test/{g}/{metric}"] * n for g, n in events.items() if n > 0)
        assert abs(weighted / 96 - test[f"test/{metric}"]) < 1e-9, (metric, test)
    # validation by the same groups at every evaluation (in metrics.csv, off the console)
    with open(os.path.join(tmp, "run", "metrics.csv"), newline="") as fh:
        valid = [r for r in csv.DictReader(fh) if r["split"] == "eval"
                 and r["name"].startswith("seen_") and r["name"].endswith("/events")]
    per_step: dict[int, float] = {}
    for row in valid:
        per_step[int(row["step"])] = per_step.get(int(row["step"]), 0.0) + float(row["value"])
    assert per_step == {s: 96.0 for s in evals}, per_step
    assert not any(line.startswith("valid @") and "seen_" in line for line in printed)
    for g, n in events.items():
        line = f"[hstu] test split, targets seen {g.removeprefix('seen_')} times in training"
        assert any(ln.startswith(line) for ln in printed) == (n > 0), (g, n)
