"""Faults end to end under the launcher (2 gloo processes): a killed rank recovers by itself,
a damaged checkpoint is one line, SIGTERM exits 143, a NaN stops with a finite latest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.test_e2e import ROOT, _env, losses, read_metrics, run_job

LAUNCH = [sys.executable, "-m", "hstu.launch", "--standalone", "--nproc_per_node", "2"]


def _cmd(run_dir: Path, tmp: Path, params: list[str], launch: list[str] = LAUNCH) -> list[str]:
    entry = [str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file", str(ROOT / "configs" / "debug_retrieval.gin")]
    for p in [f'TrainerArgs.run_dir="{run_dir}"', f'DatasetArgs.dataset_path="{tmp / "data" / "synthetic"}"',
              "TrainerArgs.log_interval=1", *params]:
        entry += ["--gin-param", p]
    return [*launch, *entry]


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def _kill_tree(proc: subprocess.Popen, run_dir: Path) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


PARAMS = ['TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=40", "TrainerArgs.eval_interval=1000",
          "TrainerArgs.ckpt_save_interval=5"]


@pytest.fixture(scope="module")
def reference(tmp) -> dict:
    """The uninterrupted run (its checkpoints are reused by the damage tests)."""
    return run_job(tmp, "ref", params=[*PARAMS, f'TrainerArgs.ckpt_save_dir="{tmp / "ckpt_ref"}"',
                                       "TrainerArgs.keep_last_n=None"])


@pytest.mark.slow  # a 2-process run killed and relaunched: about 45 s with its reference run
def test_kill9_of_a_rank_recovers_by_itself_with_the_uninterrupted_losses(tmp, reference):
    ckpt, run_dir = tmp / "ckpt_kill", tmp / "killed"
    cmd = _cmd(run_dir, tmp, [*PARAMS, f'TrainerArgs.ckpt_save_dir="{ckpt}"', 'TrainerArgs.ckpt_load_dir="auto"',
                              "TrainerArgs.keep_last_n=2"],
               launch=[*LAUNCH, "--max-restarts", "2", "--monitor-interval", "0.2"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (ckpt / "latest").exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False).stdout.split()
        assert len(workers) == 2, workers
        killed_at = time.time()
        os.kill(int(max(workers, key=int)), signal.SIGKILL)  # the second worker: rank 1
        out, _ = proc.communicate(timeout=240)
        finished = time.time()
    finally:
        _kill_tree(proc, run_dir)
    assert proc.returncode == 0, out[-6000:]
    assert "resumed from" in out and "Traceback" not in out, out[-6000:]
    print(f"\nkill -9 -> finished in {finished - killed_at:.1f} s")
    rows = read_metrics(run_dir)
    steps = [int(r["step"]) for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert steps == list(range(1, 41)), "metrics.csv repeats or misses steps after the resume"
    ref, got = losses(reference["metrics"]), losses(rows)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), f"step {s}"
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_35", "iter_40"], kept  # keep_last_n=2


# slow (a 40-step 2-process run first): the default tier checks damage detection in
# test_manifest.py (check_files, verify) and ends a torchrun run in one line in test_own_data_e2e.py
@pytest.mark.parametrize("damage", [
    pytest.param("truncate:__0_0.distcp", marks=pytest.mark.slow),
    pytest.param("truncate:dense_tp0.pt", marks=pytest.mark.slow),
    pytest.param("remove:rng_rank1.pt", marks=pytest.mark.slow),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp, reference, damage):
    how, name = damage.split(":")
    ckpt = tmp / f"ckpt_{how}_{name}"
    shutil.copytree(tmp / "ckpt_ref", ckpt)
    victim = ckpt / "iter_40" / name
    if how == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        victim.unlink()
    run_dir = tmp / f"damaged_{name}"
    proc = subprocess.run(_cmd(run_dir, tmp, [*PARAMS, f'TrainerArgs.ckpt_load_dir="{ckpt / "iter_40"}"']),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    errors = _error_lines(out)
    assert len(errors) == 1 and str(victim) in errors[0], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert (ckpt / "iter_35" / "manifest.json").exists() and (ckpt / "latest").read_text().strip() == "iter_40"


@pytest.mark.slow  # the default tier stops a run by SIGTERM in test_e2e (checkpoint, resume)
def test_sigterm_to_the_launcher_exits_143_without_the_extras(tmp):
    ckpt, run_dir = tmp / "ckpt_term", tmp / "term"
    cmd = _cmd(run_dir, tmp, ['TrainerArgs.pipeline_type="native"', "TrainerArgs.max_train_iters=100000",
                              "TrainerArgs.eval_interval=100000", f'TrainerArgs.ckpt_save_dir="{ckpt}"'])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.csv").exists() or len(losses(read_metrics(run_dir))) < 3:
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "no training progress within 240 s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler does
        out, _ = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc, run_dir)
    assert proc.returncode == 143, out[-4000:]
    assert "stopped by signal at step" in out and "stopped by SIGTERM; exit 143" in out, out[-4000:]
    assert "popularity baseline" not in out and "Traceback" not in out, out[-4000:]
    assert (ckpt / "latest").exists()


def _nan_body(rank: int, world_size: int, tmp: str) -> None:
    import hstu.training.trainer as T
    from tests.training.test_distributed import _trainer

    real = T.build_pipeline

    def poisoned(*args, **kwargs):
        pipeline = real(*args, **kwargs)
        progress, calls = pipeline.progress, [0]

        def progress_with_nan(it):
            calls[0] += 1
            if calls[0] == 7 and rank == 1:  # step 7 diverges on one rank
                p = next(trainer.model.dense_module.parameters())
                with torch.no_grad():
                    p.fill_(float("nan"))
            return progress(it)

        pipeline.progress = progress_with_nan
        return pipeline

    T.build_pipeline = poisoned
    ckpt = os.path.join(tmp, "ckpt_nan")
    trainer, _ = _trainer("retrieval", tmp, "nan", [
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=20", "TrainerArgs.log_interval=10",
        "TrainerArgs.ckpt_save_interval=5", f'TrainerArgs.ckpt_save_dir="{ckpt}"',
    ])
    with pytest.raises(FloatingPointError, match=r"^step 7: "):
        trainer.train()
    with open(os.path.join(ckpt, "latest")) as fh:
        assert fh.read().strip() == "iter_5"
    dense = torch.load(os.path.join(ckpt, "iter_5", "dense_tp0.pt"), weights_only=False)
    assert all(torch.isfinite(v).all() for m in dense["model"].values() for v in m.values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(ckpt, "iter_10"))
    trainer.close()


def test_nan_stops_naming_the_step_and_the_latest_checkpoint_is_finite(tmp):
    from tests.dist_utils import run_multiprocess

    run_multiprocess(_nan_body, world_size=2, tmp=str(tmp))


def test_learning_rate_overflowing_float32_is_a_config_error():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
         str(ROOT / "configs" / "debug_retrieval.gin"), "--gin-param", "OptimizerArgs.learning_rate=1e39",
         "--check-config"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("error: --gin-param 'OptimizerArgs.learning_rate=1e39': OptimizerArgs.learning_rate: 1e+39 is not a "
         "finite float32 (largest 3.403e+38): training would overflow at step 1")
    ], proc.stderr
