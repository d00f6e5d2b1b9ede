"""The training loop: pipeline steps, logging, evaluation, checkpoints, profiling."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from hstu.config import RunConfig
from hstu.embeddings import embedding_state_dict, load_embedding_state_dict
from hstu.training.builder import Built, build_all
from hstu.training.checkpoint import CheckpointError, load_checkpoint
from hstu.training.distributed import DistEnv, restart_count, rng_state, seed_training_rng, set_rng_state
from hstu.training.evaluate import evaluate, popularity_baseline, prior_baseline
from hstu.training.feed import Feed
from hstu.training.flops import peak_flops
from hstu.training.lifecycle import AUTO, BestTracker, CheckpointLifecycle
from hstu.training.logger import RunLogger
from hstu.training.pipeline import build_pipeline


def _position(base: dict[str, Any], steps_per_epoch: int, consumed: int) -> dict[str, Any]:
    """Loader state after ``consumed`` more batches than ``base``."""
    linear = base["epoch"] * steps_per_epoch + base["batch_index"] + consumed
    state = dict(base)
    state.update(epoch=linear // steps_per_epoch, batch_index=linear % steps_per_epoch)
    return state


def _state_mismatch(model_state: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """The first key missing on either side or of another shape, as '<key>: ...'."""
    for key, value in model_state.items():
        if key not in saved:
            return f"{key}: missing from the checkpoint"
        have, want = getattr(value, "shape", None), getattr(saved[key], "shape", None)
        if have is not None and want is not None and tuple(have) != tuple(want):
            return f"{key}: {list(want)} in the checkpoint, {list(have)} in this model"
    extra = sorted(set(saved) - set(model_state))
    return f"{extra[0]}: in the checkpoint, not in this model" if extra else None


# NetworkArgs fields a checkpoint may be loaded under with another value: they change how
# the function is computed or trained, not the function of the weights
_NETWORK_FREE = frozenset({
    "hidden_dropout", "dtype_str", "kernel_backend", "recompute_input_layernorm",
    "recompute_input_silu", "sequence_layout", "compile",
})


def network_differences(saved: dict[str, Any] | None, network: Any) -> list[str]:
    """``field=saved -> now`` for every NetworkArgs field that changes the model's function
    (two heads of 8 and four heads of 4 have the same tensor shapes, not the same model).
    Empty for a checkpoint written before the network arguments were saved."""
    if not saved:
        return []
    now = dataclasses.asdict(network)
    return [
        f"{name}={saved[name]!r} -> {now[name]!r}"
        for name in sorted(now)
        if name not in _NETWORK_FREE and name in saved and saved[name] != now[name]
    ]


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: str, config_text: str) -> None:
        self.cfg = cfg
        self.env = env
        self.args = cfg.trainer
        if not config_text:
            import gin

            config_text = gin.operative_config_str()
        self.logger = RunLogger(run_dir, env.is_main, config_text)
        # stored in every checkpoint: hstu.export rebuilds the model from it
        self.config_text = config_text
        self.logger.print(f"[hstu] run directory: {run_dir}")
        self.built: Built = build_all(cfg, env, log=self.logger.print)
        self.model = self.built.model
        self.optimizer = self.built.optimizer
        self.steps_per_epoch = len(self.built.train_loader)
        self.max_steps = self.built.total_steps
        self.step = 0
        self.data_base = self.built.train_loader.state_dict()
        self.checkpoints = CheckpointLifecycle(self.args.ckpt_save_dir, self.args.keep_last_n, self.logger.print)
        self.best = BestTracker(self.args.best_metric, self.args.early_stopping_patience)
        self.best_checkpoints = CheckpointLifecycle(os.path.join(run_dir, "best"), 1, self.logger.print)
        load_dir = self.args.ckpt_load_dir
        if not load_dir and restart_count() > 0 and self.args.ckpt_save_interval > 0:
            # a torchrun restart that started over would lose the run
            self.logger.print(f"[hstu] restart {restart_count()}: resuming from the newest checkpoint")
            load_dir = AUTO
        if self.args.ckpt_save_interval > 0 or load_dir == AUTO:
            self.checkpoints.clean_stale()
        self.best_checkpoints.clean_stale()
        path = self.checkpoints.resolve(load_dir)
        if path is not None:
            self._load(path)
        elif load_dir == AUTO:
            self.logger.print(f"[hstu] no checkpoint in {self.args.ckpt_save_dir} yet: starting fresh")
        info = self.built.info
        self.logger.print(
            f"[hstu] {cfg.task} on {info.dataset_name}: {info.num_train_samples} train / "
            f"{info.num_eval_samples} eval samples, {info.num_items} items; "
            f"world {env.world_size} (TP {env.tp_size} x DP {env.dp_size}) on {env.device}; "
            f"{self.steps_per_epoch} steps/epoch, training to step {self.max_steps}"
        )
        self.peak, self.peak_source = peak_flops(env.device, cfg.network.dtype_str)

    # ----------------------------------------------------------------- checkpoints
    def _sharded_state(self) -> dict[str, Any]:
        return {"embeddings": embedding_state_dict(self.model)}

    def _dense_children(self) -> dict[str, torch.nn.Module]:
        """Top-level submodules other than the embedding tables (those go through DCP)."""
        from hstu.embeddings import EmbeddingsByDim, HstuEmbeddings

        if not isinstance(self.model.sparse, (HstuEmbeddings, EmbeddingsByDim)):
            raise TypeError("model.sparse must hold the embedding tables")
        dense = self.model.dense_module
        out = {}
        for name, child in dense.named_children():
            if any(isinstance(m, HstuEmbeddings) for m in child.modules()):
                raise TypeError(f"model.dense.{name} nests embedding tables; checkpointing expects them in model.sparse")
            out[name] = child
        if any(True for _ in dense.parameters(recurse=False)):
            raise TypeError("the dense module has parameters outside its submodules; checkpointing cannot place them")
        return out

    def _dense_state(self) -> dict[str, Any]:
        """Dense weights (float32 masters in place of half-precision parameters), the dense
        optimizer (its state is the masters'), the schedule position and the loss scale."""
        weights = {}
        for name, child in self._dense_children().items():
            state = child.state_dict()
            for pname, p in child.named_parameters():
                master = self.optimizer.master_of(p)
                if master is not None:
                    state[pname] = master.detach().clone()
            weights[name] = state
        out = {"model": weights, "optimizer": self.optimizer.dense.state_dict(), "num_steps": self.optimizer.num_steps}
        if self.optimizer.scaler is not None:
            out["loss_scaler"] = self.optimizer.scaler.state_dict()
        return out

    def save(self, best: bool = False) -> str:
        meta = {
            "step": self.step,
            "data": _position(self.data_base, self.steps_per_epoch, self.step - self._resumed_step),
            "world_size": self.env.world_size,
            "tp_size": self.env.tp_size,
            "task": self.cfg.task,
            "best": self.best.state_dict(),
            "best_dir": self.best_checkpoints.root,
            "config_text": self.config_text,
            "network": dataclasses.asdict(self.cfg.network),
            "run_dir": os.path.abspath(self.logger.run_dir),
        }
        lifecycle = self.best_checkpoints if best else self.checkpoints
        path = lifecycle.save(
            self.step,
            self._sharded_state(),
            self._dense_state(),
            meta,
            rng_state(),
            self.env.rank,
            self.env.tp_rank,
            self.env.dp_rank,
        )
        if not best:
            self.logger.print(f"[hstu] step {self.step}: checkpoint saved to {path}")
        return path

    _resumed_step = 0

    def _load_weights(self, path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Loads tables (with their optimizer state) and dense weights; returns the rest."""
        sharded = self._sharded_state()
        dense, meta, rng = load_checkpoint(path, sharded, self.env.rank, self.env.tp_rank, self.env.tp_size)
        if meta.get("task") != self.cfg.task:
            raise CheckpointError(f"checkpoint {path} is a {meta.get('task')} run, this is {self.cfg.task}")
        changed = network_differences(meta.get("network"), self.cfg.network)
        if changed:
            raise CheckpointError(
                f"checkpoint {path} was trained with other NetworkArgs ({', '.join(changed)}); "
                "its weights would compute another function here: load it with the saved "
                "values (its config.gin) or start fresh"
            )
        load_embedding_state_dict(self.model, sharded["embeddings"])
        children = self._dense_children()
        if set(children) != set(dense["model"]):
            raise CheckpointError(
                f"checkpoint {path} holds modules {sorted(dense['model'])}, this model has {sorted(children)}"
            )
        for name, child in children.items():
            problem = _state_mismatch(child.state_dict(), dense["model"][name])
            if problem is not None:
                raise CheckpointError(f"checkpoint {path} does not fit this model: {name}.{problem}")
        masters: dict[int, torch.Tensor] = {}
        for name, child in children.items():
            child.load_state_dict(dense["model"][name])
            for pname, p in child.named_parameters():
                if self.optimizer.master_of(p) is not None:
                    masters[id(p)] = dense["model"][name][pname].float()
        self.optimizer.load_masters(masters)
        return dense, meta, rng

    def _load(self, path: str) -> None:
        dense, meta, rng = self._load_weights(path)
        self.optimizer.load_dense_state_dict(
            dense["optimizer"], int(dense["num_steps"]), dense.get("loss_scaler")
        )
        self.step = self._resumed_step = int(meta["step"])
        self.best.load_state_dict(meta.get("best"))
        if meta.get("best_dir") and self.best.step >= 0:
            self.best_checkpoints.root = meta["best_dir"]
        self.checkpoints.mark_saved(self.step, path)
        self.logger.truncate_after(self.step)  # the steps after the checkpoint are run again
        self.built.train_loader.load_state_dict(meta["data"])
        self.data_base = self.built.train_loader.state_dict()
        if rng is not None:
            set_rng_state(rng)
        else:  # this rank did not exist in the saved run: derive its streams from seed and step
            seed_training_rng(self.args.seed, self.env, step=self.step)
        self.logger.print(
            f"[hstu] resumed from {path} at step {self.step} (saved on {meta['world_size']} rank(s))"
        )

    # ----------------------------------------------------------------------- loop
    def _prepare_for_device(self) -> Any:
        """The model's input stage for training batches. Dynamic tables remap on the device
        their state lives on: on a GPU such batches are copied there first (the pipeline's
        own copy is then a no-op)."""
        model, device = self.model, self.env.device
        has_remappers = any(
            getattr(m, "remappers", None) for m in model.sparse.modules()
        )
        if not has_remappers:
            return None
        if device.type == "cuda":
            return lambda batch: model.prepare(batch.to(device, non_blocking=True))
        return model.prepare

    def train(self) -> dict[str, float]:
        args, env = self.args, self.env
        if self.step >= self.max_steps:  # resumed a finished run: nothing to do, nothing to redo
            at, last = self.logger.last_eval(self.step)
            text = " ".join(f"{k} {v:.4f}" for k, v in last.items())
            self.logger.print(
                f"[hstu] nothing left to train: the checkpoint is at step {self.step} of "
                f"{self.max_steps} (raise TrainerArgs.max_train_iters to train on)"
                + (f"; last evaluation (step {at}): {text}" if last else "")
            )
            return {}  # no new metrics (run.py prints no "final metrics" line)
        feed = Feed(self.built.train_loader, self.cfg.network, self._prepare_for_device(), env.device)
        feed_iter = iter(feed)
        pipeline = build_pipeline(args.pipeline_type, self.model, self.optimizer, env.device, log=self.logger.print)
        self.pipeline = pipeline
        self.model.train()
        profiler = self._profiler()
        bar = None
        if env.is_main and sys.stderr.isatty():  # logs and CI get the plain lines only
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.cfg.task, dynamic_ncols=True, mininterval=2.0)
        say = bar.write if bar is not None else self.logger.print
        window_loss, window_n, window_tokens, window_flops = 0.0, 0, 0, 0.0
        window_start = time.perf_counter()
        last_eval: dict[str, float] = {}
        losses: list[float] = []
        # losses (and whether the dense gradients were finite) stay on the device until a log
        # or checkpoint boundary (no host sync inside a step)
        pending: list[torch.Tensor] = []
        pending_grads: list[torch.Tensor] = []

        def flush() -> float:
            """Moves the pending losses to the host; stops at the first non-finite loss or
            gradient, naming its step (checkpoints come after a flush: never non-finite)."""
            if not pending:
                return 0.0
            values = torch.stack([x.reshape(()).float() for x in pending]).double().cpu().tolist()
            grads_ok = torch.stack(pending_grads).cpu().tolist() if pending_grads else [True] * len(values)
            first = self.step - len(pending) + 1
            pending.clear()
            pending_grads.clear()
            problem = None
            for i, (v, ok) in enumerate(zip(values, grads_ok)):
                if not math.isfinite(v):
                    problem = (first + i, f"step {first + i}: loss is {v}")
                elif not ok:
                    problem = (first + i, f"step {first + i}: a dense gradient is not finite (loss {v:.4g})")
                if problem:
                    break
            self._agree_finite(problem)
            losses.extend(values)
            return sum(values)

        self._install_signals()
        while self.step < self.max_steps:
            loss, _ = pipeline.progress(feed_iter)
            self.step += 1
            tokens, flops = feed.pop_cost()
            pending.append(loss.detach())
            if self.optimizer.last_grads_finite is not None:
                pending_grads.append(self.optimizer.last_grads_finite)
            window_n += 1
            window_tokens += tokens
            window_flops += flops
            if profiler is not None:
                profiler.step()
            if bar is not None:
                bar.update(1)
            boundary = self.step % args.log_interval == 0 or self.step == self.max_steps
            saving = args.ckpt_save_interval > 0 and self.step % args.ckpt_save_interval == 0
            if boundary or saving:
                window_loss += flush()
            if boundary:
                elapsed = time.perf_counter() - window_start
                stats = torch.tensor([window_loss, window_n, window_tokens, window_flops], dtype=torch.float64)
                dist.all_reduce(stats)
                world = env.world_size
                mean_loss = stats[0].item() / max(stats[1].item(), 1)
                # with TP, every rank of a group counts its own samples once
                tok_s = stats[2].item() / elapsed
                flop_s = stats[3].item() / elapsed
                mfu = flop_s / (self.peak * world) if self.peak > 0 else float("nan")
                metrics = {"loss": mean_loss, "lr": self.optimizer.lr, "tokens_per_s": tok_s,
                           "tflops": flop_s / 1e12, "mfu": mfu}
                if self.optimizer.last_grad_norm is not None:
                    metrics["grad_norm"] = float(self.optimizer.last_grad_norm)
                if self.optimizer.scaler is not None:
                    metrics["loss_scale"] = self.optimizer.scaler.scale
                self.logger.log(self.step, "train", metrics)
                msg = (f"step {self.step}/{self.max_steps} loss {mean_loss:.4f} lr {self.optimizer.lr:.2e} "
                       f"tokens/s {tok_s:,.0f} TFLOP/s {flop_s / 1e12:.4f} MFU {mfu:.2%}")
                say(msg)
                window_loss, window_n, window_tokens, window_flops = 0.0, 0, 0, 0.0
                window_start = time.perf_counter()
            if self.step % args.eval_interval == 0 or self.step == self.max_steps:
                pipeline.detach()
                last_eval = evaluate(self.model, self.built.eval_loader, self.cfg, env, args.max_eval_iters)
                # in-flight batches already had their input distribution: re-attach without
                # starting it again (a second one would desynchronise the all-to-alls)
                pipeline.attach(self.model, sparse_dist=False)
                self.model.train()
                self.logger.log(self.step, "eval", last_eval)
                text = " ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                split = "valid" if args.best_metric is not None else "eval"
                say(f"{split} @ step {self.step}: {text}")
                window_start = time.perf_counter()
                if args.best_metric is not None and self._track_best(last_eval, say, flush):
                    say(
                        f"[hstu] early stop at step {self.step}: no new best {args.best_metric} in "
                        f"{args.early_stopping_patience} evaluations"
                    )
                    break
            if saving:
                self.save()
                window_start = time.perf_counter()
            if (boundary or saving) and self._stop_agreed():
                path = self.save()
                say(f"[hstu] stopped by signal at step {self.step}; resume with "
                    f"TrainerArgs.ckpt_load_dir=\"{path}\" (or \"{AUTO}\")")
                self.interrupted = True
                break
        else:
            flush()
            # a finished run keeps its final state when checkpointing is on
            if args.ckpt_save_interval > 0 and self.step % args.ckpt_save_interval != 0:
                self.save()
        self._restore_signals()
        feed.close()
        if bar is not None:
            bar.close()
        if profiler is not None:
            profiler.stop()
        self.losses = losses
        if self.interrupted:  # stop promptly: no post-training extras
            return last_eval
        if args.best_metric is not None:
            last_eval = self._test_best()
        # the floor the model must clear, on the same evaluation items: popularity
        # (retrieval) or the training labels' prior (ranking); also in metrics.csv
        baseline_fn = popularity_baseline if self.cfg.task == "retrieval" else prior_baseline
        baseline = baseline_fn(
            self.built.train_loader,
            self.built.test_loader or self.built.eval_loader,
            self.cfg,
            env,
            args.max_eval_iters,
        )
        if baseline is not None:
            self.logger.log(self.step, "baseline", baseline)
            text = " ".join(f"{k} {v:.4f}" for k, v in baseline.items())
            kind = "popularity" if self.cfg.task == "retrieval" else "label-prior"
            self.logger.print(f"[hstu] {kind} baseline (same protocol): {text}")
        self._report(last_eval, baseline)
        return last_eval

    # ------------------------------------------------------------- preemption
    interrupted = False
    _stop_requested = False
    _old_handlers: dict = {}

    def _install_signals(self) -> None:
        """SIGTERM (sent by torchrun, schedulers, preemption) and SIGUSR1 ask for a checkpoint
        at the next step boundary, then a clean stop: a run is never lost to a polite kill."""

        def request(signum: int, frame: Any) -> None:
            self._stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old_handlers[sig] = signal.signal(sig, request)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _agree_finite(self, problem: tuple[int, str] | None) -> None:
        """Every rank stops on the first non-finite step of any rank (FloatingPointError)."""
        # host tensors: the default group reduces them with its host backend (gloo)
        flag = torch.tensor([0.0 if problem is None else 1.0])
        gathered = [problem]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, problem)
        found = [(p[0], rank, p[1]) for rank, p in enumerate(gathered) if p is not None]
        if found:
            _, rank, text = min(found)
            where = f" (rank {rank})" if len(gathered) > 1 else ""
            raise FloatingPointError(text + where)

    def _stop_agreed(self) -> bool:
        """All ranks stop at the same step if any rank was signalled (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])  # host, like the signal
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _track_best(self, metrics: dict[str, float], say: Any, flush: Any) -> bool:
        """Keeps a checkpoint of the best validation evaluation; True means stop early."""
        new_best, stop = self.best.update(metrics, self.step)
        if new_best:
            flush()  # never a best checkpoint of weights that went non-finite
            self.save(best=True)
            say(f"[hstu] new best {self.args.best_metric} {self.best.value:.4f} at step {self.step}")
        return stop

    def _test_best(self) -> dict[str, float]:
        """Scores the test split once, with the checkpoint that validation selected."""
        self._load_weights(self.best_checkpoints.resolve(self.best_checkpoints.root))
        metrics = evaluate(self.model, self.built.test_loader, self.cfg, self.env, self.args.max_eval_iters)
        self.logger.log(self.best.step, "eval", {f"test/{k}": v for k, v in metrics.items()})
        self.logger.log(self.best.step, "eval", {"best_step": self.best.step,
                                                  f"best_valid/{self.args.best_metric}": self.best.value})
        text = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.logger.print(
            f"[hstu] test split, best checkpoint (step {self.best.step}, valid "
            f"{self.args.best_metric} {self.best.value:.4f}): {text}"
        )
        return metrics

    def _profiler(self) -> Any:
        args = self.args
        if not args.profile:
            return None
        start = max(args.profile_step_start - self.step, 0)
        active = args.profile_step_end - max(args.profile_step_start, self.step)
        if active <= 0:
            return None
        trace_dir = os.path.join(self.logger.run_dir, "profile")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=start, warmup=0, active=active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(trace_dir, worker_name=f"rank{self.env.rank}"),
            record_shapes=False,
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
        best = None
        checkpoint = None
        if args.best_metric is not None and self.best.step >= 0:
            best = (args.best_metric, self.best.step, self.best.value)
            checkpoint = os.path.join(self.best_checkpoints.root, f"iter_{self.best.step}")
        if args.ckpt_save_interval > 0 or self.interrupted:
            checkpoint = checkpoint or args.ckpt_save_dir
            latest = args.ckpt_save_dir
        else:
            latest = None
        if latest and args.ckpt_load_dir == "auto":
            resume = (
                f"rerun the same command with a larger TrainerArgs.max_train_iters (the total step "
                f"count): ckpt_load_dir=\"auto\" resumes from the newest checkpoint in {latest}"
            )
        elif latest:
            resume = (
                f"add --gin-param 'TrainerArgs.ckpt_load_dir=\"auto\"' (newest checkpoint in "
                f"{latest}) and a larger TrainerArgs.max_train_iters (the total step count)"
            )
        else:
            resume = "no checkpoint of the last step (TrainerArgs.ckpt_save_interval = -1)"
        lines = summary_lines(
            self.cfg.task, self.logger.run_dir, final, baseline, best, checkpoint, resume
        )
        try:
            path = write_report(self.logger.run_dir, lines)
            lines.append(f"  report:         {path}")
        except ImportError as exc:  # matplotlib missing: the run itself is complete
            lines.append(f"  report:         not written ({exc}); pip install matplotlib")
        for line in lines:
            self.logger.print(line)

    def close(self) -> None:
        self.logger.close()
