r"""Publishes an online run's checkpoints as serving versions, beside the training
(docs/serving.md, "Publishing an online run").

    python -m hstu.publish --run runs/online                 # the newest checkpoint, once
    python -m hstu.publish --run runs/online --follow        # each new one, until stopped
    python -m hstu.publish --run runs/online --gate-metric HR@10 --gate-margin 0.02 \
        --gate-windows 5

Each publish exports a checkpoint (:func:`hstu.export.publish_version`) into the versioned
root (``<run>/serving`` by default): a new ``v<step>`` and ``LATEST`` naming it. With a gate,
the candidate's prequential metric over the last N windows it trained on (the run's
``metrics.csv`` rows of split ``stream``, weighted by their ``eval_events``) must be within
the margin of the figure the served version recorded when it was published; otherwise the
publish is refused in one line naming both figures, and the served version stays. Every
version records its figures in its manifest (``publish``).

Exit status (without ``--follow``): 0 published (or nothing newer to publish), 4 refused by
the gate, 2 bad input, 3 a damaged checkpoint or root.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hstu.serving import versions

EXIT_BAD_INPUT = 2
EXIT_DAMAGED = 3
EXIT_REFUSED = 4
LOWER_IS_BETTER = ("NE", "loss")
"""Gate metrics where a smaller figure is better (the others: HR@K, NDCG@K, MRR, AUC)."""


class PublishError(Exception):
    """A problem the user can fix (one line); ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Gate:
    """Publish only when ``metric`` over the candidate's last ``windows`` windows is within
    ``margin`` of the served version's figure (None: no gate; the figures are still recorded)."""

    metric: str | None = None
    margin: float = 0.0
    windows: int = 5

    def __post_init__(self) -> None:
        if self.windows < 1:
            raise PublishError(f"--gate-windows {self.windows}: at least 1 window")
        if self.margin < 0 or not math.isfinite(self.margin):
            raise PublishError(f"--gate-margin {self.margin}: a figure >= 0")

    @property
    def higher_is_better(self) -> bool:
        return (self.metric or "").split("/")[0] not in LOWER_IS_BETTER

    def admits(self, candidate: float, served: float) -> bool:
        if self.higher_is_better:
            return candidate >= served - self.margin
        return candidate <= served + self.margin


# ------------------------------------------------------------------------- the run's files


def checkpoint_root(run_dir: Path) -> Path:
    """The run's checkpoint save root: ``TrainerArgs.ckpt_save_dir`` of its
    ``operative_config.gin`` (a relative one from the current folder, as the run resolved it)."""
    from hstu.args import ConfigError
    from hstu.gin_parsing import read_bindings

    config = run_dir / "operative_config.gin"
    if not config.is_file():
        raise PublishError(f"{config}: missing (not a run directory?); give --ckpt")
    try:
        bindings = read_bindings(str(config))
    except ConfigError as exc:
        raise PublishError(f"{exc}; give --ckpt") from None
    found = [b for b in bindings
             if b.short_name == "TrainerArgs" and b.field_name == "ckpt_save_dir" and not b.scope]
    if not found or found[-1].value is None:
        # the default: <run_dir>/checkpoints for an online run, else ./checkpoints
        inside = run_dir / "checkpoints"
        return inside if inside.is_dir() else Path("./checkpoints")
    if not isinstance(found[-1].value, str):
        raise PublishError(f"{found[-1].where}: field TrainerArgs.ckpt_save_dir: not a string "
                           f"({found[-1].value!r}); give --ckpt")
    return Path(found[-1].value)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder (``iter_<step>`` with its manifest, which is
    written last) under the save root ``root``, or ``root`` itself if it is one."""
    from hstu.training import checkpoint as ckpt

    if ckpt.is_checkpoint_dir(str(root)):
        return root
    if not root.is_dir():
        raise PublishError(f"--ckpt {root}: no such folder (the run's checkpoint save root)")
    for path in ckpt.checkpoint_folders(str(root)):
        if not path.endswith(".old") and os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
            return Path(path)
    return None


def checkpoint_windows(folder: Path) -> int:
    """The windows an online checkpoint covers (its ``online.json``)."""
    path = folder / "online.json"
    try:
        return int(json.loads(path.read_text())["windows"])
    except FileNotFoundError:
        raise PublishError(f"{folder}: not an online checkpoint (no online.json); the gate reads "
                           "the stream's windows") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{path}: field windows: unreadable ({exc})", EXIT_DAMAGED) from None


def recent_figures(run_dir: Path, upto_window: int, windows: int) -> dict[str, Any]:
    """Every stream metric over the last ``windows`` evaluated windows up to window
    ``upto_window`` (each window weighted by its ``eval_events``, as the prequential summary):
    {"metrics": {name: value}, "windows": [first, last], "eval_events": n}."""
    from hstu.training.report import STREAM_METRIC, stream_windows

    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise PublishError(f"{path}: missing; the gate reads the run's stream rows")
    try:
        rows = stream_windows(str(run_dir))
    except (KeyError, ValueError) as exc:
        raise PublishError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    done = [w for w in rows
            if 0 < w.get("window", 0) <= upto_window and w.get("eval_events", 0) > 0]
    last = done[-windows:]
    sums: dict[str, list[float]] = {}
    for w in last:
        for name, value in w.items():
            if STREAM_METRIC.match(name) and math.isfinite(value):
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += value * w["eval_events"]
                total[1] += w["eval_events"]
    return {
        "metrics": {name: s / n for name, (s, n) in sorted(sums.items()) if n > 0},
        "windows": [int(last[0]["window"]), int(last[-1]["window"])] if last else None,
        "eval_events": int(sum(w["eval_events"] for w in last)),
    }


def side_by_side(run_dir: Path, upto_window: int, windows: int, metric: str,
                 served_step: int) -> dict[str, Any] | None:
    """The trained model's ``metric`` and the served version's (``served_<metric>`` rows,
    StreamArgs.score_served) over the same windows: the last ``windows`` evaluated windows up
    to ``upto_window`` that the version of step ``served_step`` scored, each weighted by its
    ``eval_events``: {"candidate", "served", "windows": [first, last], "eval_events"}; None
    when the run's rows hold no such window."""
    from hstu.training.report import SERVED_PREFIX, stream_windows

    theirs = SERVED_PREFIX + metric
    try:
        rows = stream_windows(str(run_dir))
    except (OSError, KeyError, ValueError) as exc:
        raise PublishError(f"{run_dir / 'metrics.csv'}: unreadable ({type(exc).__name__}: "
                           f"{exc})") from None
    both = [w for w in rows
            if 0 < w.get("window", 0) <= upto_window and w.get("eval_events", 0) > 0
            and w.get(SERVED_PREFIX + "step") == served_step
            and math.isfinite(w.get(metric, math.nan)) and math.isfinite(w.get(theirs, math.nan))]
    last = both[-windows:]
    if not last:
        return None
    events = sum(w["eval_events"] for w in last)
    return {"candidate": sum(w[metric] * w["eval_events"] for w in last) / events,
            "served": sum(w[theirs] * w["eval_events"] for w in last) / events,
            "windows": [int(last[0]["window"]), int(last[-1]["window"])],
            "eval_events": int(events)}


def served_record(root: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(the version served, the ``publish`` record of its manifest: None when it has none)."""
    if not root.is_dir() or not versions.is_versioned_root(root):
        return None, None
    try:
        name = versions.read_pointer(root)
    except versions.VersionError as exc:
        raise PublishError(str(exc), exc.code) from None
    if name is None:
        return None, None
    manifest = root / name / versions.MANIFEST
    try:
        record = json.loads(manifest.read_text()).get("publish")
    except (OSError, ValueError) as exc:
        raise PublishError(f"{manifest}: unreadable ({exc})", EXIT_DAMAGED) from None
    return name, record


# ------------------------------------------------------------------------------ publishing


@dataclass
class Publisher:
    run_dir: Path
    ckpt: Path
    out: Path
    keep: int = 3
    gate: Gate = Gate()
    aoti: bool = False
    params: tuple[str, ...] = ()
    log: Any = print

    def newest_published(self) -> int | None:
        if not self.out.is_dir() or not versions.is_versioned_root(self.out):
            return None
        steps = [step for step, _ in versions.list_versions(self.out)]
        return max(steps) if steps else None

    def publish_once(self, folder: Path | None = None) -> int:
        """Publishes ``folder`` (default: the newest complete checkpoint) unless a version as new
        is published already; returns the exit status (0, or EXIT_REFUSED by the gate)."""
        from hstu.training import checkpoint as ckpt

        for _ in range(3):
            chosen = folder or newest_checkpoint(self.ckpt)
            if chosen is None:
                self.log(f"[publish] no complete checkpoint under {self.ckpt} yet")
                return 0
            # held while it is read: the run's pruning (keep_last_n) keeps it until the end
            with ckpt.pin(str(chosen)):
                if chosen.is_dir():
                    return self._publish(chosen)
            if folder is not None:
                raise PublishError(f"{chosen}: removed (pruned by the run) before it was read")
        raise PublishError(f"{self.ckpt}: its newest checkpoint was pruned three times before it "
                           "could be read (keep_last_n too small for the save interval?)")

    def _publish(self, folder: Path) -> int:
        from hstu.training.checkpoint import step_of

        step = step_of(folder.name)
        newest = self.newest_published()
        if step is not None and newest is not None and step <= newest:
            self.log(f"[publish] {folder}: nothing newer than v{newest} to publish")
            return 0
        record = self.figures(folder)
        served, served_record_ = served_record(self.out)
        metric = self.gate.metric
        if metric is not None:
            ours = record["metrics"].get(metric)
            if ours is None:
                have = ", ".join(record["metrics"]) or "none"
                upto = record["checkpoint_windows"]
                self.log(f"[publish] refused {folder.name}: no {metric} in the stream rows of "
                         f"{self.run_dir / 'metrics.csv'} up to window {upto} (metrics there: "
                         f"{have}); {served or 'nothing'} stays served")
                return EXIT_REFUSED
            theirs = ((served_record_ or {}).get("metrics") or {}).get(metric)
            span, same = _span(record["windows"]), ""
            pair = None
            if served is not None:
                pair = side_by_side(self.run_dir, record["checkpoint_windows"],
                                    self.gate.windows, metric, versions.step_of(served))
                record["side_by_side"] = pair
            if pair is not None:  # the served version scored on the candidate's windows
                ours, theirs = pair["candidate"], pair["served"]
                span, same = _span(pair["windows"]), " on the same windows"
            elif served is not None:
                self.log(f"[publish] no served_{metric} rows of {served} up to window "
                         f"{record['checkpoint_windows']} in {self.run_dir / 'metrics.csv'} "
                         "(StreamArgs.score_served off, or not scored yet): comparing with the "
                         f"figure {served} recorded when it was published")
            if theirs is None:
                if served is not None:
                    self.log(f"[publish] the served {served} recorded no {metric}: publishing "
                             "without comparing")
            elif not self.gate.admits(ours, theirs):
                worse = "below" if self.gate.higher_is_better else "above"
                self.log(
                    f"[publish] refused {folder.name}: {metric} {ours:.4f} over windows {span} is "
                    f"{worse} the served {served}'s {theirs:.4f}{same} by more than the margin "
                    f"{self.gate.margin:g}; {served} stays served"
                )
                return EXIT_REFUSED
            else:
                self.log(f"[publish] gate passed: {metric} {ours:.4f} over windows {span}, the "
                         f"served {served}'s {theirs:.4f}{same} (margin {self.gate.margin:g})")
        from hstu.export import publish_version

        publish_version(self.out, str(folder), keep=self.keep, params=list(self.params),
                        aoti=self.aoti, log=self.log, publish_info=record)
        return 0

    def figures(self, folder: Path) -> dict[str, Any]:
        """What a version records: the gate's settings and the stream metrics over the last
        ``gate.windows`` windows of the checkpoint."""
        windows = checkpoint_windows(folder)
        record: dict[str, Any] = {"checkpoint": str(folder.resolve()),
                                  "checkpoint_windows": windows, "gate_metric": self.gate.metric,
                                  "gate_margin": self.gate.margin,
                                  "gate_windows": self.gate.windows}
        if (self.run_dir / "metrics.csv").is_file() or self.gate.metric is not None:
            record.update(recent_figures(self.run_dir, windows, self.gate.windows))
        else:
            record.update(metrics={}, windows=None, eval_events=0)
        return record

    def follow(self, poll_seconds: float, stop: threading.Event) -> None:
        """Publishes each new checkpoint as it lands until ``stop`` is set; a failed or refused
        one is said in one line and not tried again."""
        from hstu.export import ExportError
        from hstu.training.checkpoint import CheckpointError

        tried: set[str] = set()
        while not stop.is_set():
            folder = newest_checkpoint(self.ckpt)
            if folder is not None and str(folder) not in tried:
                tried.add(str(folder))
                try:
                    with turn(self.out, self.log):
                        self.publish_once(newest_checkpoint(self.ckpt))
                except (ExportError, PublishError, CheckpointError) as exc:
                    self.log(f"[publish] error: {folder}: {exc}")
            stop.wait(poll_seconds)


TURN_LOCK = ".publisher.lock"


@contextmanager
def turn(root: Path, log: Any = print) -> Iterator[None]:
    """Publishers of one root take turns (an exclusive ``flock`` on ``<root>/.publisher.lock``,
    waited for): one that starts while another exports waits, then publishes the newest
    checkpoint there is by then."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / TURN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[publish] another publisher of {root} is running: waiting for its turn")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _span(windows: list[int] | None) -> str:
    return "-" if not windows else f"{windows[0]}-{windows[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hstu.publish",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the online run's directory (metrics.csv, "
                        "operative_config.gin)")
    parser.add_argument("--ckpt", default=None,
                        help="its checkpoint save root, or one checkpoint folder (default: "
                             "TrainerArgs.ckpt_save_dir of the run's operative_config.gin)")
    parser.add_argument("--out", default=None, help="the versioned serving root (default: "
                        "<run>/serving)")
    parser.add_argument("--keep", type=int, default=3, metavar="K", help="versions kept (3)")
    parser.add_argument("--follow", action="store_true",
                        help="keep publishing each new checkpoint until SIGTERM/SIGINT")
    parser.add_argument("--poll", type=float, default=10.0, metavar="S",
                        help="with --follow: seconds between looks for a new checkpoint (10)")
    parser.add_argument("--gate-metric", default=None, metavar="NAME",
                        help="publish only if this stream metric (HR@10, NDCG@10, AUC, NE, ...) "
                             "is within the margin of the served version's")
    parser.add_argument("--gate-margin", type=float, default=0.0, metavar="M",
                        help="how much worse than the served version's figure is allowed (0)")
    parser.add_argument("--gate-windows", type=int, default=5, metavar="N",
                        help="the figure is over the checkpoint's last N evaluated windows (5)")
    parser.add_argument("--aoti", action="store_true",
                        help="also compile the AOTInductor package (minutes on a CPU)")
    parser.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                        help="extra gin binding for the export")
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="lower this process's CPU priority by N (os.nice) so a training "
                             "beside it keeps its pace (the online loop's publishers: 10)")
    ns = parser.parse_args(argv)
    if ns.keep < 1:
        parser.error(f"--keep {ns.keep}: keep at least 1 version")
    if ns.nice < 0:
        parser.error(f"--nice {ns.nice}: only a lower priority (N >= 0)")
    if ns.nice:
        os.nice(ns.nice)
    from hstu.console import fail, quiet_start

    quiet_start()
    from hstu.args import ConfigError
    from hstu.data.errors import DataError
    from hstu.export import ExportError
    from hstu.training.checkpoint import CheckpointError

    try:
        run_dir = Path(ns.run)
        if not run_dir.is_dir():
            raise PublishError(f"--run {ns.run}: no such folder")
        publisher = Publisher(
            run_dir=run_dir, ckpt=Path(ns.ckpt) if ns.ckpt else checkpoint_root(run_dir),
            out=Path(ns.out) if ns.out else run_dir / "serving", keep=ns.keep,
            gate=Gate(ns.gate_metric, ns.gate_margin, ns.gate_windows), aoti=ns.aoti,
            params=tuple(ns.gin_param),
        )
        if not ns.follow:
            with turn(publisher.out, publisher.log):
                return publisher.publish_once()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        publisher.follow(ns.poll, stop)
        return 0
    except PublishError as exc:
        return fail(str(exc), exc.code)
    except ExportError as exc:
        return fail(str(exc), exc.code)
    except (ConfigError, DataError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except CheckpointError as exc:
        return fail(str(exc), EXIT_DAMAGED)


if __name__ == "__main__":
    sys.exit(main())
