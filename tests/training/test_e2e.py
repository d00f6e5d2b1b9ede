"""End to end: the real entry points under torchrun (2 gloo processes on CPU).

Runs are shared between tests (module fixtures) to keep the suite short.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _job_cmd(tmp: Path, run_dir: Path, params: list[str], task: str = "retrieval",
             nproc: int | None = 2, preset: str | None = None) -> list[str]:
    """A run of the debug preset (or ``preset``) into ``run_dir`` over the synthetic data
    under ``tmp``, logging every step, ``params`` after those; under torchrun with ``nproc``
    ranks, or (None) as one plain process."""
    entry = [str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file",
             str(ROOT / "configs" / (preset or f"debug_{task}.gin"))]
    for p in [f'TrainerArgs.run_dir="{run_dir}"',
              f'DatasetArgs.dataset_path="{tmp / "data" / "synthetic"}"',
              "TrainerArgs.log_interval=1", *params]:
        entry += ["--gin-param", p]
    if nproc is None:
        return [sys.executable, *entry]
    return [*TORCHRUN, "--nproc_per_node", str(nproc), *entry]


def run_job(tmp: Path, name: str, task: str = "retrieval", nproc: int | None = 2,
            params: list[str] = (), preset: str | None = None, timeout: int = 300) -> dict:
    run_dir = tmp / name
    proc = subprocess.run(
        _job_cmd(tmp, run_dir, params, task, nproc, preset), cwd=ROOT, env=_env(),
        capture_output=True, check=False, text=True, timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{out[-6000:]}"
    return {"dir": run_dir, "out": out, "metrics": read_metrics(run_dir)}


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def losses(metrics: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["value"]) for r in metrics if r["split"] == "train" and r["name"] == "loss"}


def evals(metrics: list[dict]) -> dict[str, float]:
    last_step = max(int(r["step"]) for r in metrics if r["split"] == "eval")
    return {r["name"]: float(r["value"]) for r in metrics if r["split"] == "eval" and int(r["step"]) == last_step}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def retrieval_none(tmp) -> dict:
    return run_job(tmp, "ret_none", params=['TrainerArgs.pipeline_type="none"',
                                             "TrainerArgs.ckpt_save_interval=10",
                                             "TrainerArgs.profile=True",
                                             "TrainerArgs.profile_step_start=2",
                                             "TrainerArgs.profile_step_end=4",
                                             f'TrainerArgs.ckpt_save_dir="{tmp / "ckpt_ref"}"'])


def test_retrieval_trains_and_writes_run_directory(retrieval_none):
    run_dir = retrieval_none["dir"]
    assert (run_dir / "operative_config.gin").read_text().count("TrainerArgs.train_batch_size") == 1
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,split,name,value"
    loss = losses(retrieval_none["metrics"])
    assert sorted(loss) == list(range(1, 21))
    assert all(math.isfinite(v) for v in loss.values())
    assert loss[20] < loss[1], "the loss must go down"
    names = {r["name"] for r in retrieval_none["metrics"] if r["split"] == "eval"}
    # each metric and its standard error over the evaluation users
    assert names == {"HR@10", "NDCG@10", "MRR", "stderr/HR@10", "stderr/NDCG@10", "stderr/MRR"}
    train_names = {r["name"] for r in retrieval_none["metrics"] if r["split"] == "train"}
    assert {"loss", "lr", "tokens_per_s", "tflops", "mfu"} <= train_names
    assert "final retrieval metrics" in retrieval_none["out"]
    assert "popularity baseline (same protocol)" in retrieval_none["out"]
    traces = list((run_dir / "profile").glob("rank*.json")) + list((run_dir / "profile").glob("rank*.pt.trace.json"))
    assert {p.name.split(".")[0] for p in traces} == {"rank0", "rank1"}, list((run_dir / "profile").iterdir())


# both slow: the default tier runs the pipelines against "none" in test_pipelines.py (native over
# the sharded tables) and test_sync_matrix.py (the prefetch cell)
@pytest.mark.parametrize("pipeline", [pytest.param("native", marks=pytest.mark.slow),
                                      pytest.param("prefetch", marks=pytest.mark.slow)])
def test_pipelines_give_identical_losses(tmp, retrieval_none, pipeline):
    other = run_job(tmp, f"ret_{pipeline}", params=[f'TrainerArgs.pipeline_type="{pipeline}"'])
    assert losses(other["metrics"]) == losses(retrieval_none["metrics"])
    assert evals(other["metrics"]) == evals(retrieval_none["metrics"])
    if pipeline == "prefetch":
        assert "pipeline_type=prefetch not applicable" in other["out"]


def test_checkpoint_layout(tmp, retrieval_none):
    root = tmp / "ckpt_ref"
    assert (root / "latest").read_text().strip() == "iter_20"
    for step in (10, 20):
        d = root / f"iter_{step}"
        assert (d / "meta.pt").exists() and (d / ".metadata").exists() and (d / "dense_tp0.pt").exists()
        assert (d / "rng_rank0.pt").exists() and (d / "rng_rank1.pt").exists()
    assert not any(p.name.endswith(".tmp") for p in root.iterdir())


@pytest.mark.slow  # the default tier kills a rank in test_faults (kill -9, hstu.launch)
def test_kill_after_checkpoint_then_resume_continues_the_same_losses(tmp, retrieval_none):
    ckpt = tmp / "ckpt_kill"
    run_dir = tmp / "ret_killed"
    # Same run, but long enough that it is still training when killed.
    cmd = _job_cmd(tmp, run_dir, [
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=2000",
        "TrainerArgs.eval_interval=2000", "TrainerArgs.ckpt_save_interval=10",
        f'TrainerArgs.ckpt_save_dir="{ckpt}"',
    ])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (ckpt / "latest").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        # SIGKILL torchrun and its workers (workers run in sessions of their own; every
        # process of this run has the unique run_dir on its command line)
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
        proc.wait()
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True,
                             check=False).returncode == 0:
            assert time.time() < deadline, "workers of the killed run are still alive"
            time.sleep(0.2)
    first = (ckpt / "latest").read_text().strip()
    assert first.startswith("iter_")
    step = int(first.split("_")[1])
    assert step % 10 == 0 and step < 20, f"killed too late to compare ({first})"
    resumed = run_job(tmp, "ret_resumed", params=[
        'TrainerArgs.pipeline_type="none"', f'TrainerArgs.ckpt_load_dir="{ckpt / first}"',
    ])
    assert f"resumed from {ckpt / first} at step {step}" in resumed["out"]
    ref = losses(retrieval_none["metrics"])
    got = losses(resumed["metrics"])
    assert sorted(got) == list(range(step + 1, 21))
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), f"step {s}"
    assert evals(resumed["metrics"]) == pytest.approx(evals(retrieval_none["metrics"]), rel=1e-5)


def test_resume_two_ranks_onto_one_plain_process(tmp, retrieval_none):
    one = run_job(tmp, "ret_one_rank", nproc=None, params=[
        'TrainerArgs.pipeline_type="none"', f'TrainerArgs.ckpt_load_dir="{tmp / "ckpt_ref"}"',
        "TrainerArgs.max_train_iters=25",
    ])
    assert "saved on 2 rank(s)" in one["out"] and "world 1 (TP 1 x DP 1)" in one["out"]
    got = losses(one["metrics"])
    assert sorted(got) == list(range(21, 26))
    assert all(math.isfinite(v) for v in got.values())
    # it continued from the trained state: far below the untrained loss
    assert max(got.values()) < losses(retrieval_none["metrics"])[1]


@pytest.mark.slow  # (a second launch on a finished run)
def test_evaluate_scores_a_checkpoint_as_its_run_did_and_trains_nothing(tmp, retrieval_none):
    """--evaluate (2 ranks, as the run: the preset evaluates max_eval_iters batches per rank):
    the checkpoint of step 20 scores what the run's own evaluation at step 20 scored; no step
    is trained, nothing is saved."""
    ckpt = tmp / "ckpt_ref"
    before = sorted(p.name for p in ckpt.iterdir())
    proc = subprocess.run(
        [*_job_cmd(tmp, tmp / "ret_eval_only", [
            f'TrainerArgs.ckpt_load_dir="{ckpt / "iter_20"}"',
            f'TrainerArgs.ckpt_save_dir="{tmp / "ckpt_eval_only"}"']), "--evaluate"],
        cwd=ROOT, env=_env(), capture_output=True, check=False, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "eval of the checkpoint at step 20: " in out
    rows = read_metrics(tmp / "ret_eval_only")
    assert {r["split"] for r in rows} == {"eval"}  # no training step
    assert evals(rows) == pytest.approx(evals(retrieval_none["metrics"]), rel=1e-5)
    assert not (tmp / "ckpt_eval_only").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == before
    # an earlier checkpoint scored into the run's own directory: the run's rows stay (a resume
    # would cut those after its step)
    copy = tmp / "ret_none_copy"
    shutil.copytree(retrieval_none["dir"], copy)
    rows_before = (copy / "metrics.csv").read_text()
    proc = subprocess.run(
        [*_job_cmd(tmp, copy, [f'TrainerArgs.ckpt_load_dir="{ckpt / "iter_10"}"']), "--evaluate"],
        cwd=ROOT, env=_env(), capture_output=True, check=False, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    after = (copy / "metrics.csv").read_text()
    assert after.startswith(rows_before) and len(after) > len(rows_before)
    # without a checkpoint: one line naming the field
    proc = subprocess.run(
        [*_job_cmd(tmp, tmp / "ret_eval_none", [], nproc=None), "--evaluate"],
        cwd=ROOT, env=_env(), capture_output=True, check=False, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "TrainerArgs.ckpt_load_dir: --evaluate needs a checkpoint to score" in errors[0]


# About one epoch of the synthetic data (63 steps): long enough that what the model learnt shows
# in the evaluation, as cheap as 10 steps (the run's time is its start-up).
RANKING_PARAMS = ["TrainerArgs.max_train_iters=60", "TrainerArgs.eval_interval=60"]


@pytest.fixture(scope="module")
def ranking_none(tmp) -> dict:
    return run_job(tmp, "rank_none", task="ranking",
                   params=['TrainerArgs.pipeline_type="none"', *RANKING_PARAMS])


def test_ranking_trains_and_reports_auc(ranking_none):
    loss = losses(ranking_none["metrics"])
    assert sorted(loss) == list(range(1, 61)) and all(math.isfinite(v) for v in loss.values())
    final = evals(ranking_none["metrics"])
    # The same run untrained (learning rates 1e-30) scores AUC 0.49-0.54 and an evaluation loss
    # within 0.02 of its first training loss over TrainerArgs.seed 1234, 1, 2, 3, 4; trained,
    # AUC 0.61-0.63 and a loss 0.28-0.46 below the first. A constant score's AUC is 0.5.
    assert final["AUC"] > 0.58, f"AUC {final['AUC']:.4f}: no better than a model that learnt nothing"
    assert final["loss"] < loss[1] - 0.15, f"evaluation loss {final['loss']:.4f} vs first {loss[1]:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["native", "prefetch"])
def test_ranking_pipelines_match_none(tmp, ranking_none, pipeline):
    other = run_job(tmp, f"rank_{pipeline}", task="ranking",
                    params=[f'TrainerArgs.pipeline_type="{pipeline}"', *RANKING_PARAMS])
    assert losses(other["metrics"]) == losses(ranking_none["metrics"])
    assert evals(other["metrics"]) == evals(ranking_none["metrics"])


def test_best_checkpoint_selected_on_validation_then_test_scored_once(tmp):
    run = run_job(tmp, "ret_best", params=[
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=12",
        "TrainerArgs.eval_interval=3", 'TrainerArgs.best_metric="MRR"',
        "DatasetArgs.holdout_validation=True", "TrainerArgs.early_stopping_patience=2",
    ])
    rows = run["metrics"]
    valid = {int(r["step"]): float(r["value"]) for r in rows if r["split"] == "eval" and r["name"] == "MRR"}
    best_step = max(valid, key=lambda s: (valid[s], -s))  # first step reaching the maximum
    chosen = [float(r["value"]) for r in rows if r["name"] == "best_step"]
    assert chosen == [best_step]
    assert any(r["name"] == "test/MRR" and int(r["step"]) == best_step for r in rows)
    saved = [p.name for p in (run["dir"] / "best").iterdir() if p.name.startswith("iter_")]
    assert saved == [f"iter_{best_step}"]
    # patience 2: training stops two evaluations after the last improvement (or at the end)
    assert max(valid) == min(12, best_step + 2 * 3)


@pytest.mark.slow  # (TP steps equal one process in tests/training/test_distributed.py)
def test_tensor_parallel_two_ranks_runs(tmp):
    tp = run_job(tmp, "rank_tp2", task="ranking", params=[
        "TensorModelParallelArgs.tensor_model_parallel_size=2", *RANKING_PARAMS,
        "NetworkArgs.contextual_embedding_dim=8",  # tables of two dims, one collection each
        'TrainerArgs.pipeline_type="native"',
    ])
    assert "world 2 (TP 2 x DP 1)" in tp["out"]
    loss = losses(tp["metrics"])
    assert sorted(loss) == list(range(1, 61)) and all(math.isfinite(v) for v in loss.values())
    final = evals(tp["metrics"])
    # as test_ranking_trains_and_reports_auc: untrained 0.49-0.54, trained one process 0.61-0.63
    assert final["AUC"] > 0.58, f"AUC {final['AUC']:.4f}: no better than a model that learnt nothing"
    assert final["loss"] < loss[1] - 0.15, f"evaluation loss {final['loss']:.4f} vs first {loss[1]:.4f}"


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp):
    ckpt = tmp / "ckpt_sigterm"
    run_dir = tmp / "ret_sigterm"
    cmd = _job_cmd(tmp, run_dir, [
        'TrainerArgs.pipeline_type="native"', "TrainerArgs.max_train_iters=2000",
        "TrainerArgs.eval_interval=2000", f'TrainerArgs.ckpt_save_dir="{ckpt}"',
    ])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.csv").exists() or len(losses(read_metrics(run_dir))) < 3:
            assert proc.poll() is None, "the run ended before it was signalled"
            assert time.time() < deadline, "no training progress within 240 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C on torchrun would
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
    assert "stopped by signal at step" in out, out[-3000:]
    latest = (ckpt / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 3 and step == max(losses(read_metrics(run_dir)))
    resumed = run_job(tmp, "ret_after_sigterm", params=[
        'TrainerArgs.pipeline_type="native"', f'TrainerArgs.ckpt_load_dir="{ckpt}"',
        f"TrainerArgs.max_train_iters={step + 3}",
    ])
    assert sorted(losses(resumed["metrics"])) == [step + 1, step + 2, step + 3]
