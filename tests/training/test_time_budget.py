"""TrainerArgs.time_budget_minutes: the step count that fits, and a run that keeps to it."""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hstu.training.budget import SAFETY, affordable_steps, evaluations_between
from tests.training.test_e2e import losses, read_metrics, run_job


def _evaluations_counted(step: int, end: int, interval: int) -> int:
    return sum(1 for s in range(step + 1, end + 1) if s % interval == 0 or s == end)


def test_evaluations_between_counts_each_due_evaluation() -> None:
    for step in range(25):
        for end in range(40):
            for interval in (1, 3, 5, 10, 50):
                assert evaluations_between(step, end, interval) == _evaluations_counted(
                    step, end, interval
                ), (step, end, interval)


def _brute_force(budget_s, elapsed_s, step, step_s, eval_s, interval, max_steps) -> int:
    left = SAFETY * budget_s - elapsed_s - eval_s
    fits = [
        n for n in range(step, max_steps + 1)
        if (n - step) * step_s + _evaluations_counted(step, n, interval) * eval_s <= left
    ]
    return max(fits) if fits else step


def test_affordable_steps_is_the_largest_count_that_fits() -> None:
    rng = random.Random(0)
    cut = 0
    for _ in range(400):
        args = {
            "budget_s": rng.uniform(1, 200), "elapsed_s": rng.uniform(0, 60),
            "step": rng.randrange(0, 50), "step_s": rng.uniform(0.01, 2.0),
            "eval_s": rng.uniform(0, 10), "eval_interval": rng.randrange(1, 30),
        }
        args["max_steps"] = args["step"] + rng.randrange(0, 400)
        want = _brute_force(*args.values())
        got = affordable_steps(**args)
        assert got == want, args
        cut += args["step"] < got < args["max_steps"]
    assert cut > 50  # the cases exercised the search, not only its two ends


def test_affordable_steps_edges() -> None:
    common = {"step": 10, "step_s": 1.0, "eval_s": 2.0, "eval_interval": 5, "max_steps": 100}
    # time already spent: not one more step
    assert affordable_steps(budget_s=60, elapsed_s=100, **common) == 10
    # room for everything: the configured count, never more
    assert affordable_steps(budget_s=10_000, elapsed_s=0, **common) == 100
    # 0.95 * 100 - 20 - 2 (test) = 73 s: 55 steps + 11 evaluations = 77 > 73, 52 steps + 11 = 74 > 73
    # 51 steps (to 61) and 11 evaluations (15..60 and 61) = 73 fits
    assert affordable_steps(budget_s=100, elapsed_s=20, **common) == 61


class _Run(SimpleNamespace):
    """The state Trainer._fit_budget reads and writes, on a clock the test sets."""

    def _set_max_steps(self, steps: int) -> None:
        self.max_steps = steps
        self.budget_pending = False


def test_later_evaluations_plan_again_with_the_pace_so_far(monkeypatch) -> None:
    import hstu.training.trainer as trainer_module
    from hstu.training.budget import REPLAN_LONGER, REPLAN_SHORTER
    from hstu.training.trainer import Trainer

    now = {"t": 0.0}
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now["t"])
    lines: list[str] = []
    cap = 6000  # the configured length (steps or epochs)
    run = _Run(args=SimpleNamespace(time_budget_minutes=10.0), started=0.0, max_steps=cap,
               step=40, eval_interval=40, budget_pending=True, budget_replans=False,
               budget_cap=cap, logger=SimpleNamespace(print=lines.append))

    def fits(step_s: float, eval_s: float = 2.0) -> int:
        return affordable_steps(budget_s=600, elapsed_s=now["t"], step=run.step, step_s=step_s,
                                eval_s=eval_s, eval_interval=40, max_steps=cap)

    now["t"] = 20.0  # the first decision: 0.2 s a step
    first = fits(0.2)
    Trainer._fit_budget(run, 0.2, 2.0)
    assert run.max_steps == first and first < cap and run.budget_replans
    assert "training to step" in lines[-1] and "than planned" not in lines[-1]
    # later, on the pace planned: nothing changes, nothing is said
    run.step, now["t"] = 1000, 20.0 + 960 * 0.2 + 24 * 2.0
    Trainer._fit_budget(run, 0.2, 2.0)
    assert run.max_steps == first and len(lines) == 1
    # a pace a little slower (within REPLAN_SHORTER of the plan) moves nothing
    pace = next(p / 1000 for p in range(201, 400)
                if first * REPLAN_SHORTER <= fits(p / 1000) < first)
    Trainer._fit_budget(run, pace, 2.0)
    assert run.max_steps == first and len(lines) == 1
    # the steps turn dearer: the run ends sooner, and says so
    run.step, now["t"] = 1400, now["t"] + 400 * 0.35 + 10 * 2.0
    slower = fits(0.25)
    Trainer._fit_budget(run, 0.25, 2.0)
    assert run.max_steps == slower < first
    assert lines[-1].endswith(f"slower than planned; training to step {slower} instead of "
                              f"{first} (the learning-rate schedule ends there)")
    # a pace a little faster (within REPLAN_LONGER of the plan) moves nothing
    run.step, now["t"] = 1440, now["t"] + 40 * 0.25 + 2.0
    pace = next(p / 1000 for p in range(250, 0, -1)
                if slower < fits(p / 1000) <= slower * REPLAN_LONGER)
    Trainer._fit_budget(run, pace, 2.0)
    assert run.max_steps == slower and len(lines) == 2
    # much faster: longer again, never past the configured length
    Trainer._fit_budget(run, 0.02, 2.0)
    assert run.max_steps == fits(0.02) > slower * REPLAN_LONGER
    assert "faster than planned" in lines[-1] and len(lines) == 3
    Trainer._fit_budget(run, 0.0001, 0.01)
    assert run.max_steps == cap


def test_later_plans_take_the_pace_since_the_first_evaluation() -> None:
    """StepPace: the first plan times every step from UNTIMED_STEPS in; a later one the steps
    since the first evaluation (when RECENT_MIN_STEPS ran), evaluations left out."""
    from hstu.training.budget import RECENT_MIN_STEPS, UNTIMED_STEPS, StepPace

    clock = {"t": 5.0, "evals": 0.0}
    pace = StepPace(0, clock["t"], clock["evals"])

    def steps(first: int, last: int, seconds: float) -> None:
        for step in range(first, last + 1):
            clock["t"] += seconds
            pace.stepped(step, clock["t"], clock["evals"])

    def evaluate(step: int, seconds: float) -> tuple[float, float]:
        now = (clock["t"], clock["evals"])
        clock["t"] += seconds
        clock["evals"] += seconds
        pace.evaluated(step, clock["t"], clock["evals"])
        return now

    steps(1, UNTIMED_STEPS, 30.0)  # one-off costs: not timed
    steps(UNTIMED_STEPS + 1, 10, 1.0)
    # too few steps since the start of the clock... the first plan is every step timed
    assert pace.seconds(10, *evaluate(10, 7.0), recent=True) == pytest.approx(1.0)
    steps(11, 10 + RECENT_MIN_STEPS - 1, 0.5)
    # too few since the first evaluation: every step timed
    every = (7 * 1.0 + (RECENT_MIN_STEPS - 1) * 0.5) / (10 + RECENT_MIN_STEPS - 1 - UNTIMED_STEPS)
    now = evaluate(10 + RECENT_MIN_STEPS - 1, 7.0)
    assert pace.seconds(10 + RECENT_MIN_STEPS - 1, *now, recent=True) == pytest.approx(every)
    steps(10 + RECENT_MIN_STEPS, 210, 0.5)
    steps(211, 250, 0.7)  # the host slows a little: the pace since the first evaluation
    now = evaluate(250, 7.0)
    since_first = (200 * 0.5 + 40 * 0.7) / 240
    assert pace.seconds(250, *now, recent=True) == pytest.approx(since_first)
    assert pace.seconds(250, *now, recent=False) == pytest.approx(
        (7 * 1.0 + 200 * 0.5 + 40 * 0.7) / (250 - UNTIMED_STEPS))


def test_between_evaluations_a_slower_host_ends_the_plan_sooner(monkeypatch) -> None:
    """Trainer._guard_budget: a plan whose remaining work still fits the whole budget stays (a
    pace slower than planned but inside the budget's margin included); one that no longer fits
    ends where SAFETY of the budget does, and never sooner than the next step."""
    import hstu.training.trainer as trainer_module
    from hstu.training.trainer import Trainer

    now = {"t": 0.0}
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now["t"])
    lines: list[str] = []
    run = _Run(args=SimpleNamespace(time_budget_minutes=10.0), started=0.0, max_steps=1000,
               step=600, eval_interval=100, logger=SimpleNamespace(print=lines.append))
    # 400 steps and 5 evaluations (at 700, 800, 900, 1000, the test split) left: at 0.5 s a
    # step and 2 s an evaluation, 210 s of work
    now["t"] = 600 - 210.0  # ends exactly on the budget: kept, nothing said
    Trainer._guard_budget(run, 0.5, 2.0)
    assert run.max_steps == 1000 and not lines
    now["t"] += 1.0  # one second more: shortened to what SAFETY of the budget leaves
    want = affordable_steps(budget_s=600, elapsed_s=now["t"], step=600, step_s=0.5, eval_s=2.0,
                            eval_interval=100, max_steps=1000)
    Trainer._guard_budget(run, 0.5, 2.0)
    assert run.max_steps == want and 600 < want < 1000
    assert lines[-1] == (f"[hstu] time budget 10 min: {now['t']:.0f} s spent by step 600, "
                         f"0.500 s a step since the last evaluation: step 1000 would end past the "
                         f"budget; training to step {want} (the learning-rate schedule ends there)")
    # a faster pace later never lengthens the plan here
    Trainer._guard_budget(run, 0.01, 2.0)
    assert run.max_steps == want and len(lines) == 1
    # the budget already spent: one more step, whose evaluation ends the run
    now["t"] = 700.0
    Trainer._guard_budget(run, 0.5, 2.0)
    assert run.max_steps == 601


def test_the_last_stretch_is_where_no_evaluation_is_left_before_the_end() -> None:
    from hstu.training.budget import last_stretch

    assert not last_stretch(600, 1000, 100)  # 700, 800, 900 still evaluate
    assert not last_stretch(899, 1000, 100)
    assert last_stretch(900, 1000, 100) and last_stretch(950, 1000, 100)
    assert last_stretch(910, 950, 100)  # the end between two evaluations
    assert not last_stretch(790, 850, 100) and last_stretch(800, 850, 100)


def test_the_check_between_evaluations_times_the_steps_since_the_last_one() -> None:
    from hstu.training.budget import GUARD_MIN_STEPS, StepPace

    pace = StepPace(0, 0.0, 0.0)
    assert pace.since_evaluation(50, 50.0) is None  # no evaluation yet
    pace.evaluated(40, 100.0, 8.0)
    assert pace.since_evaluation(40 + GUARD_MIN_STEPS - 1, 150.0) is None  # too few steps
    assert pace.since_evaluation(40 + 2 * GUARD_MIN_STEPS, 100.0 + 3.0 * GUARD_MIN_STEPS
                                 ) == pytest.approx(1.5)
    pace.evaluated(80, 200.0, 10.0)  # the next evaluation restarts it
    assert pace.since_evaluation(80 + GUARD_MIN_STEPS, 200.0 + GUARD_MIN_STEPS) == pytest.approx(1.0)


def test_the_command_line_budget_counts_from_the_process_start(plain_process, monkeypatch
                                                               ) -> None:
    """A run from the command line (argv None: this process's own) takes its clock from
    hstu.STARTED, set at the first import of hstu, so that imports and set-up are inside the
    budget; a run given its argv (called from Python) leaves it to the Trainer."""
    import sys

    import hstu
    import hstu.training.run
    from hstu.cli import main

    seen = []
    monkeypatch.setattr(hstu.training.run, "run", lambda cfg, evaluate_only: seen.append(cfg)
                        or 0)
    argv = ["--gin-config-file", "configs/benchmark_retrieval.gin",
            "--gin-param", "TrainerArgs.time_budget_minutes=1"]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setattr(sys, "argv", ["pretrain_gr_retrieval.py", *argv])
    assert main("retrieval") == 0
    assert main("retrieval", argv) == 0
    assert [cfg.started for cfg in seen] == [hstu.STARTED, None]
    assert seen[0].trainer.time_budget_minutes == 1


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("budget")


@pytest.mark.slow
def test_a_run_fits_its_budget_and_a_resume_keeps_the_choice(tmp) -> None:
    configured = 100_000
    params = [
        'TrainerArgs.pipeline_type="none"', f"TrainerArgs.max_train_iters={configured}",
        # (1.0: a slow host spent 30 s by step 40, its start-up included; 0.75 left 12 s spare)
        "TrainerArgs.eval_interval=4", "TrainerArgs.time_budget_minutes=1.0",
        'OptimizerArgs.lr_decay_style="linear"', "OptimizerArgs.min_learning_rate=0.0",
        "OptimizerArgs.lr_warmup_iters=0", "TrainerArgs.ckpt_save_interval=100000",
        f'TrainerArgs.ckpt_save_dir="{tmp / "ckpt"}"',
    ]
    run = run_job(tmp, "budget", params=params, timeout=240)
    line = re.search(
        r"\[hstu\] time budget 1 min: (\d+) s spent by step 40, ([\d.]+) s a step, "
        r"([\d.]+) s an evaluation: 100000 steps would not fit; training to step (\d+)",
        run["out"],
    )
    assert line, run["out"][-3000:]
    chosen = int(line.group(4))
    assert 40 < chosen < configured
    # a later evaluation may plan again (a pace other than at step 40's): said in a line
    replans = re.findall(r"(?:slower|faster) than planned; training to step (\d+) instead of "
                         r"(\d+)", run["out"])
    for (new, planned), before in zip(replans, [chosen] + [int(a) for a, _ in replans]):
        assert int(planned) == before and int(new) != before
    chosen = int(replans[-1][0]) if replans else chosen
    loss = losses(run["metrics"])
    assert max(loss) == chosen and len(loss) == chosen  # every step up to the chosen one
    # the schedule ends at the chosen step: linear decay from 1e-3 to 0 over `chosen` steps
    lr = {int(r["step"]): float(r["value"]) for r in run["metrics"]
          if r["split"] == "train" and r["name"] == "lr"}
    assert lr[chosen] == pytest.approx(0.0, abs=1e-12)
    if not replans:
        middle = chosen // 2
        assert lr[middle] == pytest.approx(1e-3 * (1 - middle / chosen), rel=1e-6)
    # a resumed run keeps the choice: nothing left to train
    again = run_job(tmp, "budget", params=[*params, 'TrainerArgs.ckpt_load_dir="auto"'],
                    timeout=240)
    assert f"keeps its chosen step count, training to step {chosen}" in again["out"]
    assert max(losses(read_metrics(tmp / "budget"))) == chosen


@pytest.mark.slow
def test_a_long_evaluation_interval_still_decides_early(tmp) -> None:
    """An evaluation interval past the budget: the run evaluates PROBE_STEPS steps in to time
    itself, decides there, and evaluates again only at its last step."""
    from hstu.training.budget import PROBE_STEPS

    # (1.5: CI's host, two tests at once, had spent the whole of 0.75 min by step 100)
    params = [
        'TrainerArgs.pipeline_type="none"', "TrainerArgs.max_train_iters=100000",
        "TrainerArgs.eval_interval=50000", "TrainerArgs.time_budget_minutes=1.5",
    ]
    run = run_job(tmp, "probe", params=params, timeout=300)
    line = re.search(rf"\[hstu\] time budget 1.5 min: \d+ s spent by step {PROBE_STEPS}, "
                     r".*training to step (\d+)", run["out"])
    assert line, run["out"][-3000:]
    chosen = int(line.group(1))
    # no evaluation is left before the end: the check after it may end the run sooner
    guard = re.findall(r"since the last evaluation: step \d+ would end past the budget; "
                       r"training to step (\d+)", run["out"])
    if guard:
        assert int(guard[-1]) < chosen
        chosen = int(guard[-1])
    evaluated = sorted({int(r["step"]) for r in run["metrics"] if r["split"] == "eval"})
    # (a host that spent the budget by the probe ends there: one evaluation, at PROBE_STEPS)
    assert evaluated == sorted({PROBE_STEPS, chosen}) and max(losses(run["metrics"])) == chosen


@pytest.mark.parametrize("binding", ["TrainerArgs.time_budget_minutes=5",
                                     "TrainerArgs.max_train_epochs=3",
                                     "TrainerArgs.eval_interval_epochs=0.5"])
def test_online_training_refuses_a_time_budget_and_epochs(clean_gin, binding) -> None:
    from hstu.config import load_config
    from hstu.training.online import OnlineTrainer
    from hstu.validation import ConfigError

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "configs" / "ml-100k_stream_retrieval.gin"),
                      [binding], task="retrieval", world_size=1)
    with pytest.raises(ConfigError) as err:
        OnlineTrainer._check(cfg, SimpleNamespace(tp_size=1))
    line = str(err.value).splitlines()[0]
    assert line.startswith(binding.split("=")[0]) and "stream" in line
