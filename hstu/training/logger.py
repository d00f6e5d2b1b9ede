"""The run directory: operative_config.gin, metrics.csv (step,split,name,value), TensorBoard."""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import gin

from hstu.console import close_log, keep_log


def make_run_dir(run_dir: str | None, task: str) -> str:
    if run_dir:
        return run_dir
    return os.path.join("runs", f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")


class RunLogger:
    """Writes on rank 0 only; other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: str, enabled: bool, config_text: str = "") -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._csv = None
        self._writer = None
        self._tb = None
        if not enabled:
            keep_log(None)  # only rank 0 keeps the diverted third-party warnings
            return
        os.makedirs(run_dir, exist_ok=True)
        keep_log(run_dir)
        with open(os.path.join(run_dir, "operative_config.gin"), "w") as fh:
            fh.write(config_text or gin.operative_config_str())
        path = os.path.join(run_dir, "metrics.csv")
        # empty: a run killed before its first rows were flushed (its header included)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        # held open for the run (closed by close())
        self._csv = open(path, "a", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(["step", "split", "name", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=run_dir)
        except Exception as exc:  # noqa: BLE001 - TensorBoard is optional for the run itself
            print(f"[hstu] TensorBoard disabled: {exc}", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """Drops the rows (and TensorBoard events) of steps after ``step``: a resumed run logs
        them again."""
        if not self.enabled:
            return
        self.keep_rows(lambda rows: [r for r in rows if r and r[0].isdigit() and int(r[0]) <= step])
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=self.run_dir, purge_step=step + 1)

    def keep_rows(self, keep: Callable[[list[list[str]]], list[list[str]]]) -> int:
        """Rewrites metrics.csv with the rows ``keep`` returns of its rows (in file order,
        header left out) and appends after them; returns how many were dropped (none: the
        file is left as it is)."""
        if not self.enabled:
            return 0
        path = os.path.join(self.run_dir, "metrics.csv")
        self._csv.close()
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        kept = keep(rows)
        if len(kept) != len(rows):
            tmp = path + ".tmp"
            with open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows([["step", "split", "name", "value"], *kept])
            os.replace(tmp, path)
        self._csv = open(path, "a", newline="")  # noqa: SIM115 - held open, closed by close()
        self._writer = csv.writer(self._csv)
        return len(rows) - len(kept)

    def last_eval(self, step: int) -> tuple[int, dict[str, float]]:
        """(step, metrics) of the last evaluation at or before ``step`` in metrics.csv (its
        test rows ``test/...`` and best-step bookkeeping left out); (step, {}) if none."""
        if not self.enabled:
            return step, {}
        self._csv.flush()
        with open(os.path.join(self.run_dir, "metrics.csv"), newline="") as fh:
            rows = [
                r for r in csv.DictReader(fh)
                if r["split"] == "eval" and r["step"].isdigit() and int(r["step"]) <= step
                and "/" not in r["name"] and not r["name"].startswith("best_")
            ]
        if not rows:
            return step, {}
        last = max(int(r["step"]) for r in rows)
        return last, {r["name"]: float(r["value"]) for r in rows if int(r["step"]) == last}

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            value = float(value)
            self._writer.writerow([step, split, name, repr(value)])
            if self._tb is not None:
                self._tb.add_scalar(f"{split}/{name}", value, step)
        self._csv.flush()

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        close_log()
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
