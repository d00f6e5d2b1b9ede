"""The training loop: ``Trainer.train`` over ``Trainer.train_step``, with its collaborators
(checkpoints: :mod:`hstu.training.checkpoint_manager`; the metrics window and preemption:
:mod:`hstu.training.loop`; evaluation, best checkpoint and early stopping:
:class:`Validation`), the profiler and the end-of-run report."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from hstu.config import RunConfig
from hstu.model.metrics import STDERR_PREFIX
from hstu.training.budget import (
    GUARD_EVERY,
    MIN_TIMED_STEPS,
    PROBE_STEPS,
    REPLAN_LONGER,
    REPLAN_SHORTER,
    StepPace,
    affordable_steps,
    agree_min,
    budget_line,
    guard_line,
    last_stretch,
    remaining_seconds,
    replan_line,
    run_length,
)
from hstu.training.budget import length_line as run_length_line
from hstu.training.builder import Built, build_all
from hstu.training.checkpoint_manager import CheckpointManager
from hstu.training.distributed import DistEnv
from hstu.training.evaluate import (
    COUNT_GROUPS,
    evaluate,
    item_rate_baseline,
    popularity_baseline,
    prior_baseline,
)
from hstu.training.feed import Feed
from hstu.training.flops import peak_flops
from hstu.training.lifecycle import AUTO
from hstu.training.logger import RunLogger
from hstu.training.loop import Eta, MetricsWindow, Preemption, train_line
from hstu.training.pipeline import build_pipeline
from hstu.training.report import PER_ITEM
from hstu.validation import ConfigError

DEFAULT_CKPT_DIR = "./checkpoints"
"""TrainerArgs.ckpt_save_dir of a batch run that leaves it None."""


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without their standard errors (``stderr/``) and count groups (``seen_``;
    :func:`_count_group_lines` prints those)."""
    return {k: v for k, v in metrics.items() if not k.startswith((STDERR_PREFIX, *COUNT_GROUPS))}


def _metrics_text(metrics: dict[str, float]) -> str:
    """``name value`` pairs; a metric with a standard error (``stderr/<name>``) as
    ``name value ±stderr``."""
    parts = []
    for k, v in _headline(metrics).items():
        error = metrics.get(STDERR_PREFIX + k)
        parts.append(f"{k} {v:.4f}" + ("" if error is None else f" ±{error:.4f}"))
    return " ".join(parts)


def _errors(count: float) -> str:
    """``1 standard error``, ``2 standard errors``."""
    return f"{count:g} standard error" + ("" if count == 1 else "s")


def _count_group_lines(split: str, metrics: dict[str, float]) -> list[str]:
    """One line per group of targets by their count in training (``seen_<lo>-<hi>/`` keys,
    :class:`hstu.training.evaluate.TargetCounts`) that holds any."""
    lines = []
    for prefix in COUNT_GROUPS:
        events = metrics.get(prefix + "events", 0.0)
        if events > 0:
            group = {k.removeprefix(prefix): v for k, v in metrics.items()
                     if k.startswith(prefix) and k != prefix + "events"}
            times = prefix.removeprefix("seen_").rstrip("/")
            lines.append(f"[hstu] {split}, targets seen {times} times in training "
                         f"({events:,.0f} users): {_metrics_text(group)}")
    return lines


class Validation:
    """Evaluation every ``eval_interval`` steps (or eval_interval_epochs), at the last one and,
    with a time budget not yet decided, PROBE_STEPS steps into training; with
    ``TrainerArgs.best_metric``, the best checkpoint and early stopping; after training, the
    test split scored with the best checkpoint."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.args = trainer.args
        self.seconds = 0.0  # the last evaluation's
        self.total_seconds = 0.0  # every evaluation's (the time budget's pace leaves them out)

    def due(self, step: int) -> bool:
        t = self.trainer
        return (step % t.eval_interval == 0 or step == t.max_steps
                or (t.budget_pending and step == t.budget_probe_step))

    def run(
        self, step: int, pipeline: Any, window: MetricsWindow, say: Callable[[str], None]
    ) -> tuple[dict[str, float], bool]:
        """(metrics, stop early now) of the evaluation at ``step``. With a weight average
        (TrainerArgs.ema_decay) it is in the model throughout: the weights evaluated are the
        ones a new best checkpoint saves (one swap for both)."""
        t, args = self.trainer, self.args
        with t.averaged():
            pipeline.detach()
            started = time.perf_counter()
            metrics = evaluate(t.model, t.built.eval_loader, t.cfg, t.env, args.max_eval_iters)
            seconds = time.perf_counter() - started
            self.seconds = seconds  # the last evaluation's (TrainerArgs.time_budget_minutes)
            self.total_seconds += seconds
            # in-flight batches already had their input distribution: re-attach without
            # starting it again (a second one would desynchronise the all-to-alls)
            pipeline.attach(t.model, sparse_dist=False)
            t.model.train()
            t.logger.log(step, "eval", metrics)
            split = "valid" if args.best_metric is not None else "eval"
            say(f"{split} @ step {step}: {_metrics_text(metrics)} ({seconds:.1f} s)")
            window.restart_clock()
            if args.best_metric is None:
                return metrics, False
            best = t.checkpoint.best
            new_best, stop = best.update(metrics, step)
            if best.loss_limit is not None and not metrics["loss"] < best.loss_limit:
                say(
                    f"[hstu] step {step} not eligible as best: valid loss "
                    f"{metrics['loss']:.4f} is not below the label prior's {best.loss_limit:.4f}"
                )
            if new_best:
                # never a best checkpoint of weights that went non-finite
                window.flush(step)
                t.checkpoint.save(step, best=True)
                if best.fallback:
                    say(
                        f"[hstu] provisional selection at step {step}: lowest valid loss so far "
                        f"{best.fallback_loss:.4f} (no evaluation eligible yet)"
                    )
                elif best.peak_step == step:
                    say(f"[hstu] new best {args.best_metric} {best.value:.4f} at step {step}")
                else:
                    say(
                        f"[hstu] selected step {step}: {args.best_metric} {best.value:.4f} is "
                        f"within {_errors(args.best_within_stderr)} "
                        f"({best.margin:.4f}) of the best, {best.peak_value:.4f} at step "
                        f"{best.peak_step} (TrainerArgs.best_within_stderr)"
                    )
        if stop:
            within = (
                f" or within {_errors(args.best_within_stderr)} of it"
                if args.best_within_stderr > 0 else ""
            )
            say(
                f"[hstu] early stop at step {step}: no new best {args.best_metric}{within} in "
                f"{args.early_stopping_patience} evaluations"
            )
        return metrics, stop

    def test_best(self) -> dict[str, float]:
        """Scores the test split once, with the checkpoint that validation selected."""
        t, metric = self.trainer, self.args.best_metric
        for line in self.selection_lines():
            t.logger.print(line)
        t.checkpoint.load_best_weights()
        metrics = evaluate(t.model, t.built.test_loader, t.cfg, t.env, self.args.max_eval_iters)
        best = t.checkpoint.best
        t.logger.log(best.step, "eval", {f"test/{k}": v for k, v in metrics.items()})
        t.logger.log(
            best.step, "eval", {"best_step": best.step, f"best_valid/{metric}": best.value}
        )
        t.logger.print(
            f"[hstu] test split, best checkpoint (step {best.step}, valid "
            f"{metric} {best.value:.4f}): {_metrics_text(metrics)}"
        )
        for line in _count_group_lines("test split", metrics):
            t.logger.print(line)
        return metrics

    def selection_lines(self) -> list[str]:
        """TrainerArgs.best_requires_loss_below_prior: how many evaluations were not eligible,
        and, when none was, that the selection is the lowest valid loss instead; then which
        step had the highest valid metric and, when it is not the selected one, why."""
        best = self.trainer.checkpoint.best
        lines = []
        if best.loss_limit is not None:
            limit = f"the label prior's {best.loss_limit:.4f}"
            lines += [self._eligibility_line(best, limit), *self._top_line(best, limit)]
        if best.tolerance > 0 and not best.fallback and 0 <= best.peak_step != best.step:
            lines.append(
                f"[hstu] selected step {best.step} (valid {self.args.best_metric} "
                f"{best.value:.4f}): the latest within {_errors(best.tolerance)} "
                f"({best.margin:.4f}) of the highest, {best.peak_value:.4f} at step "
                f"{best.peak_step} (TrainerArgs.best_within_stderr)"
            )
        return lines

    def _top_line(self, best: Any, limit: str) -> list[str]:
        metric = self.args.best_metric
        if best.top_step < 0:  # a checkpoint of an older version: not tracked
            return []
        if best.top_step == best.step:
            line = (
                f"[hstu] highest valid {metric}: {best.top_value:.4f} at step {best.top_step} "
                "(the selected checkpoint)"
            )
        else:
            line = (
                f"[hstu] highest valid {metric}: {best.top_value:.4f} at step {best.top_step}, "
                f"not selected: its valid loss {best.top_loss:.4f} is not below {limit} (a "
                "checkpoint worse than a constant score is never selected; "
                "TrainerArgs.best_requires_loss_below_prior)"
            )
        return [line]

    def _eligibility_line(self, best: Any, limit: str) -> str:
        if best.fallback:
            return (
                f"[hstu] WARNING: no evaluation's valid loss was below {limit} "
                f"({best.ineligible} not eligible): the selected checkpoint is the one with the "
                f"lowest valid loss (step {best.step}, loss {best.fallback_loss:.4f}), not the "
                f"best {self.args.best_metric}"
            )
        return (
            f"[hstu] best selection: {best.ineligible} evaluation(s) not eligible (valid "
            f"loss not below {limit})"
        )


class Trainer:
    """One run: builds everything, resumes (``self.checkpoint``), trains, reports.

    ``step`` is the number of optimizer steps taken (the checkpoint's after a resume);
    ``losses`` every loss of this rank once trained; ``interrupted`` true after a stop by
    signal (its state saved)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: str, config_text: str,
                 evaluate_only: bool = False) -> None:
        # TrainerArgs.time_budget_minutes counts from here
        self.started = cfg.started if cfg.started is not None else time.monotonic()
        if cfg.trainer.ckpt_save_dir is None:  # (an online run set its own: inside the run)
            cfg.trainer = replace(cfg.trainer, ckpt_save_dir=DEFAULT_CKPT_DIR)
        self.cfg = cfg
        self.env = env
        self.args = cfg.trainer
        if not config_text:
            import gin

            config_text = gin.operative_config_str()
        self.logger = RunLogger(run_dir, env.is_main, config_text)
        self.logger.print(f"[hstu] run directory: {run_dir}")
        self.built: Built = build_all(cfg, env, log=self.logger.print)
        self.model = self.built.model
        self.optimizer = self.built.optimizer
        self.steps_per_epoch = len(self.built.train_loader)
        self.max_steps, self.eval_interval = run_length(self.args, self.steps_per_epoch)
        assert self.max_steps == self.built.total_steps
        length = run_length_line(self.args, self.steps_per_epoch, self.max_steps,
                                 self.eval_interval)
        if length is not None:
            self.logger.print(length)
        self.step = 0
        self.losses: list[float] = []  # every step's loss on this rank, once trained
        self.interrupted = False  # stopped by a signal (state saved)
        self.pipeline: Any = None
        self.checkpoint = CheckpointManager(
            cfg, env, self.model, self.optimizer, self.built.train_loader, run_dir,
            config_text, self.logger.print,
        )
        if self.args.best_requires_loss_below_prior and not evaluate_only:
            self._set_prior_limit()  # (a selection rule: --evaluate selects nothing)
        resumed = self.checkpoint.resume()
        self.resumed = resumed is not None
        if resumed is not None:
            self.step = resumed
            if not evaluate_only:  # --evaluate: a run directory's rows are never cut
                self.logger.truncate_after(resumed)  # the steps after the checkpoint run again
        self.validation = Validation(self)
        self.budget_pending = self.args.time_budget_minutes is not None and not evaluate_only
        self.budget_replans = False  # the budget decided in this process: later evaluations
        # plan again with the pace so far, never past the configured length
        self.budget_cap = self.max_steps  # (only the budget changes max_steps from here on)
        # the budget's decision comes with an evaluation PROBE_STEPS steps in at the latest
        self.budget_probe_step = self.step + PROBE_STEPS
        self.budget_decide_from = self.step + MIN_TIMED_STEPS
        if self.budget_pending and self.checkpoint.budget_steps is not None:
            kept = min(self.max_steps, int(self.checkpoint.budget_steps))
            self.logger.print(f"[hstu] time budget: the resumed run keeps its chosen step count, "
                              f"training to step {kept}")
            self._set_max_steps(kept)
        info = self.built.info
        world = f"world {env.world_size} (TP {env.tp_size} x DP {env.dp_size}) on {env.device}"
        if "StreamArgs" in cfg.extras and info.dataset_name == "stream":  # online, no dataset
            self.logger.print(f"[hstu] {cfg.task} on a stream: samples window by window, an item "
                              f"table of {info.num_items - 1} rows; {world}")
        else:
            self.logger.print(
                f"[hstu] {cfg.task} on {info.dataset_name}: {info.num_train_samples} train / "
                f"{info.num_eval_samples} eval samples, {info.num_items} items; {world}; "
                f"{self.steps_per_epoch} steps/epoch, training to step {self.max_steps}"
            )
        self.peak, self.peak_source = peak_flops(env.device, cfg.network.dtype_str)

    def _set_max_steps(self, steps: int) -> None:
        self.max_steps = steps
        self.optimizer.set_total_steps(steps)
        self.checkpoint.budget_steps = steps
        self.budget_pending = False

    def _fit_budget(self, step_s: float, eval_s: float) -> None:
        """TrainerArgs.time_budget_minutes, at the first evaluation: the step count that fits;
        at each later one, the count that fits the pace of all the steps timed so far, where it
        is REPLAN_SHORTER shorter than the plan or REPLAN_LONGER longer (never past the
        configured length)."""
        minutes = self.args.time_budget_minutes
        assert minutes is not None
        elapsed = time.monotonic() - self.started
        configured = self.budget_cap
        fits = affordable_steps(
            budget_s=60.0 * minutes, elapsed_s=elapsed, step=self.step, step_s=step_s,
            eval_s=eval_s, eval_interval=self.eval_interval, max_steps=configured,
        )
        chosen = agree_min(fits)
        if self.budget_replans:
            planned = self.max_steps
            if chosen < planned * REPLAN_SHORTER or chosen > planned * REPLAN_LONGER:
                self.logger.print(replan_line(
                    minutes=minutes, elapsed_s=elapsed, step=self.step, step_s=step_s,
                    eval_s=eval_s, chosen=chosen, planned=planned,
                ))
                self._set_max_steps(chosen)
            return
        self.budget_replans = True
        self.logger.print(budget_line(
            minutes=minutes, elapsed_s=elapsed, step=self.step, step_s=step_s, eval_s=eval_s,
            chosen=chosen, configured=configured,
        ))
        self._set_max_steps(chosen)

    def _guard_budget(self, step_s: float, eval_s: float) -> None:
        """TrainerArgs.time_budget_minutes after the last evaluation before the plan's end
        (budget.GUARD_EVERY): where the plan's remaining work at ``step_s`` a step no longer
        fits the budget, the step count that fits SAFETY of it (at least one more step: the
        last one evaluates). Every rank calls it at the same steps (one all-reduce)."""
        minutes = self.args.time_budget_minutes
        assert minutes is not None
        elapsed = time.monotonic() - self.started
        planned = self.max_steps
        work = remaining_seconds(step=self.step, end=planned, step_s=step_s, eval_s=eval_s,
                                 eval_interval=self.eval_interval)
        fits = planned
        if elapsed + work > 60.0 * minutes:
            fits = max(self.step + 1, affordable_steps(
                budget_s=60.0 * minutes, elapsed_s=elapsed, step=self.step, step_s=step_s,
                eval_s=eval_s, eval_interval=self.eval_interval, max_steps=planned,
            ))
        chosen = agree_min(fits)
        if chosen < planned:
            self.logger.print(guard_line(minutes=minutes, elapsed_s=elapsed, step=self.step,
                                         step_s=step_s, chosen=chosen, planned=planned))
            self._set_max_steps(chosen)

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """The weight average in the model for the duration (TrainerArgs.ema_decay), or
        nothing to do without one."""
        ema = self.checkpoint.ema
        return ema.swapped() if ema is not None else contextlib.nullcontext()

    def _set_prior_limit(self) -> None:
        """TrainerArgs.best_requires_loss_below_prior: the label prior's loss on the validation
        candidates the selection evaluates (same batches, same max_eval_iters) is the limit."""
        prior = prior_baseline(
            self.built.train_loader, self.built.eval_loader, self.cfg, self.env,
            self.args.max_eval_iters,
        )
        if prior is None:
            raise ConfigError(
                "TrainerArgs",
                "best_requires_loss_below_prior",
                "needs training labels to form a label prior (real ranking data; the benchmark "
                "data has none)",
            )
        self.checkpoint.best.loss_limit = prior["loss"]
        self.logger.print(
            f"[hstu] best {self.args.best_metric} only among evaluations whose valid loss is "
            f"below the label prior's {prior['loss']:.4f}"
        )

    # ----------------------------------------------------------------------- loop
    def _prepare_for_device(self) -> Any:
        """The model's input stage for training batches: dynamic tables remap the host batch
        (their state is host memory) before the pipeline copies it to the device."""
        remaps = any(getattr(m, "remappers", None) for m in self.model.sparse.modules())
        return self.model.prepare if remaps else None

    def open_batches(self) -> Feed:
        """The training batches (iterate the Feed) and the pipeline that steps over them
        (``self.pipeline``); ``close()`` the Feed when done."""
        prepare = self._prepare_for_device()
        feed = Feed(self.built.train_loader, self.cfg.network, prepare, self.env.device)
        self.open_pipeline()
        return feed

    def open_pipeline(self) -> None:
        """``self.pipeline``, the pipeline that steps over the training batches."""
        self.pipeline = build_pipeline(
            self.args.pipeline_type, self.model, self.optimizer, self.env.device,
            log=self.logger.print,
        )
        from hstu.embeddings.dynamic import PIPELINE_IN_FLIGHT
        from hstu.training.pipeline import SequentialPipeline

        # a pipeline reads batch i + 2 while i and i + 1 still use their rows: dynamic tables
        # must not evict those rows for it
        in_flight = 0 if isinstance(self.pipeline, SequentialPipeline) else PIPELINE_IN_FLIGHT
        for module in self.model.sparse.modules():
            for remapper in getattr(module, "remappers", {}).values():
                remapper.in_flight_steps = in_flight

    def train_step(self, batches: Iterator[Any]) -> torch.Tensor:
        """One optimizer step on the next batch (zero_grad -> forward -> backward -> step,
        run by the pipeline); returns its loss, detached, still on the device."""
        loss, _ = self.pipeline.progress(batches)
        self.step += 1
        if self.checkpoint.ema is not None:
            self.checkpoint.ema.update()
        return loss.detach()

    def train(self) -> dict[str, float]:
        args = self.args
        if self.step >= self.max_steps:  # resumed a finished run: nothing to do, nothing to redo
            return self._nothing_left()
        feed = self.open_batches()
        batches = iter(feed)
        self.model.train()
        profiler = self._profiler()
        bar = self._progress_bar()
        say = bar.write if bar is not None else self.logger.print
        window = MetricsWindow(self.peak, self.env.world_size)
        self.losses = window.losses
        last_eval: dict[str, float] = {}
        eta = Eta(self.step)
        # the budget's pace: seconds a training step, the evaluations' seconds left out
        pace = StepPace(self.step, time.monotonic(), self.validation.total_seconds)
        with Preemption() as preemption, contextlib.closing(feed):
            while self.step < self.max_steps:
                loss = self.train_step(batches)
                pace.stepped(self.step, time.monotonic(), self.validation.total_seconds)
                cost = feed.pop_cost()
                window.record(loss, self.optimizer.last_grads_finite, cost.tokens, cost.flops)
                if profiler is not None:
                    profiler.step()
                if bar is not None:
                    bar.update(1)
                boundary = self.step % args.log_interval == 0 or self.step == self.max_steps
                every = args.ckpt_save_interval
                saving = every > 0 and self.step % every == 0
                if boundary or saving:
                    window.flush(self.step)
                if boundary:
                    metrics = window.summarize(self.optimizer)
                    self.logger.log(self.step, "train", metrics)
                    say(train_line(self.step, self.max_steps, metrics,
                                   eta.seconds(self.step, self.max_steps)))
                if self.validation.due(self.step):
                    step_s = pace.seconds(self.step, time.monotonic(),
                                          self.validation.total_seconds,
                                          recent=self.budget_replans)
                    last_eval, stop = self.validation.run(self.step, self.pipeline, window, say)
                    pace.evaluated(self.step, time.monotonic(), self.validation.total_seconds)
                    if stop:
                        break
                    if (self.budget_pending and self.step >= self.budget_decide_from
                            or self.budget_replans and self.step < self.max_steps):
                        self._fit_budget(step_s, self.validation.seconds)
                elif (self.budget_replans and self.step < self.max_steps
                      and self.step % GUARD_EVERY == 0
                      and last_stretch(self.step, self.max_steps, self.eval_interval)):
                    recent = pace.since_evaluation(self.step, time.monotonic())
                    if recent is not None:  # (the same steps on every rank)
                        self._guard_budget(recent, self.validation.seconds)
                if saving:
                    self.checkpoint.save(self.step)
                    window.restart_clock()
                if (boundary or saving) and preemption.agreed():
                    path = self.checkpoint.save(self.step)
                    say(f"[hstu] stopped by signal at step {self.step}; resume with "
                        f"TrainerArgs.ckpt_load_dir=\"{path}\" (or \"{AUTO}\")")
                    self.interrupted = True
                    break
            else:
                window.flush(self.step)
                # a finished run keeps its final state when checkpointing is on
                if args.ckpt_save_interval > 0 and self.step % args.ckpt_save_interval != 0:
                    self.checkpoint.save(self.step)
        # the sharded modules' own forwards back (a TorchRec pipeline replaces them with ones
        # that return its prefetched batch's lookups): what follows looks up other ids
        self.pipeline.detach()
        if bar is not None:
            bar.close()
        if profiler is not None:
            profiler.stop()
        if self.interrupted:  # stop promptly: no post-training extras
            return last_eval
        return self._after_training(last_eval)

    @torch.no_grad()
    def evaluate_checkpoint(self) -> dict[str, float]:
        """The entry points' ``--evaluate``: the loaded checkpoint's weights (their average,
        where the run kept one) scored on the evaluation split and, where the data holds one
        out, the test split, with this configuration's evaluation settings; nothing is trained
        or saved. Returns the metrics, the test split's as ``test/<metric>``."""
        if not self.resumed:
            raise ConfigError(
                "TrainerArgs", "ckpt_load_dir",
                f"--evaluate needs a checkpoint to score, and {self.args.ckpt_load_dir!r} "
                "holds none: point it at a run's checkpoint folder (e.g. RUN/best)")
        splits = [("valid" if self.built.test_loader is not None else "eval", "",
                   self.built.eval_loader)]
        if self.built.test_loader is not None:
            splits.append(("test", "test/", self.built.test_loader))
        out: dict[str, float] = {}
        self.model.eval()
        with self.averaged():
            for split, prefix, loader in splits:
                started = time.perf_counter()
                metrics = evaluate(self.model, loader, self.cfg, self.env, self.args.max_eval_iters)
                seconds = time.perf_counter() - started
                self.logger.log(self.step, "eval", {f"{prefix}{k}": v for k, v in metrics.items()})
                self.logger.print(f"{split} of the checkpoint at step {self.step}: "
                                  f"{_metrics_text(metrics)} ({seconds:.1f} s)")
                for line in _count_group_lines(split, metrics):
                    self.logger.print(line)
                out.update({f"{prefix}{k}": v for k, v in metrics.items()})
        return out

    def _length_field(self) -> str:
        """The TrainerArgs field that sets this run's length."""
        return "max_train_epochs" if self.args.max_train_epochs is not None else "max_train_iters"

    def _nothing_left(self) -> dict[str, float]:
        at, last = self.logger.last_eval(self.step)
        self.logger.print(
            f"[hstu] nothing left to train: the checkpoint is at step {self.step} of "
            f"{self.max_steps} (raise TrainerArgs.{self._length_field()} to train on)"
            + (f"; last evaluation (step {at}): {_metrics_text(last)}" if last else "")
        )
        return {}  # no new metrics (run.py prints no "final metrics" line)

    def _progress_bar(self) -> Any:
        if not (self.env.is_main and sys.stderr.isatty()):  # logs and CI: the plain lines only
            return None
        from tqdm import tqdm

        return tqdm(total=self.max_steps, initial=self.step, desc=self.cfg.task,
                    dynamic_ncols=True, mininterval=2.0)

    def _after_training(self, last_eval: dict[str, float]) -> dict[str, float]:
        """The test split (best checkpoint), the baseline and the report."""
        args, env = self.args, self.env
        if args.best_metric is not None:
            last_eval = self.validation.test_best()
        # the floor the model must clear, on the same evaluation items: popularity
        # (retrieval) or the training labels' prior (ranking); also in metrics.csv
        baseline_fn = popularity_baseline if self.cfg.task == "retrieval" else prior_baseline
        floor_inputs = (self.built.train_loader, self.built.test_loader or self.built.eval_loader,
                        self.cfg, env, args.max_eval_iters)
        baseline = baseline_fn(*floor_inputs)
        if baseline is not None:
            self.logger.log(self.step, "baseline", baseline)
            kind = "popularity" if self.cfg.task == "retrieval" else "label-prior"
            self.logger.print(f"[hstu] {kind} baseline (same protocol): {_metrics_text(baseline)}")
        # ranking: a non-sequential floor with an AUC (the prior's is 0.5 by construction):
        # each candidate scored with its item's training label rate; rows per_item/<metric>
        per_item = item_rate_baseline(*floor_inputs)
        if per_item is not None:
            named = {f"{PER_ITEM}{k}": v for k, v in per_item.items()}
            self.logger.log(self.step, "baseline", named)
            self.logger.print(
                "[hstu] per-item baseline (each candidate scored with its item's training label "
                f"rate; same candidates): {_metrics_text(per_item)}"
            )
            baseline = {**(baseline or {}), **named}
        self._report(last_eval, baseline)
        return last_eval

    def _profiler(self) -> Any:
        args = self.args
        if not args.profile:
            return None
        start = max(args.profile_step_start - self.step, 0)
        active = args.profile_step_end - max(args.profile_step_start, self.step)
        if active <= 0:
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=start, warmup=0, active=active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                os.path.join(self.logger.run_dir, "profile"), worker_name=f"rank{self.env.rank}"
            ),
        )
        prof.start()
        return prof

    # ------------------------------------------------------------------ report
    def _report(self, final: dict[str, float], baseline: dict[str, float] | None) -> None:
        """Rank 0: the end-of-run summary on the console and report.html with the curves."""
        if not self.env.is_main:
            return
        from hstu.training.report import summary_lines, write_report

        args = self.args
        best = checkpoint = None
        tracker = self.checkpoint.best
        if args.best_metric is not None and tracker.step >= 0:
            best = (args.best_metric, tracker.step, tracker.value)
            checkpoint = self.checkpoint.best_checkpoint
        if args.ckpt_save_interval > 0 or self.interrupted:
            checkpoint = checkpoint or args.ckpt_save_dir
            latest = args.ckpt_save_dir
        else:
            latest = None
        if latest and args.ckpt_load_dir == "auto":
            resume = (
                f"rerun the same command with a larger TrainerArgs.{self._length_field()} (the "
                f"run's whole length): ckpt_load_dir=\"auto\" resumes from the newest checkpoint "
                f"in {latest}"
            )
        elif latest:
            resume = (
                f"add --gin-param 'TrainerArgs.ckpt_load_dir=\"auto\"' (newest checkpoint in "
                f"{latest}) and a larger TrainerArgs.{self._length_field()} (the run's whole "
                "length)"
            )
        else:
            resume = "no checkpoint of the last step (TrainerArgs.ckpt_save_interval = -1)"
        # a semantic-id model has no export yet (docs/model.md "Semantic ids")
        # the summary's metrics without their standard errors and groups (those follow)
        lines = summary_lines(
            self.cfg.task, self.logger.run_dir, _headline(final), baseline, best, checkpoint,
            resume,
            exportable=self.cfg.network.architecture != "hstu_sid",
        )
        lines[2:2] = [
            "  " + line.removeprefix("[hstu] test split, ")
            for line in _count_group_lines("test split", final)
        ]
        # the label-prior rule: what was not eligible, or that nothing was (right under "best")
        lines[2:2] = [
            "  selection:      " + line.removeprefix("[hstu] ")
            for line in self.validation.selection_lines()
        ]
        try:
            path = write_report(self.logger.run_dir, lines)
            lines.append(f"  report:         {path}")
        except ImportError as exc:  # matplotlib missing: the run itself is complete
            lines.append(f"  report:         not written ({exc}); pip install matplotlib")
        for line in lines:
            self.logger.print(line)

    def close(self) -> None:
        self.logger.close()
