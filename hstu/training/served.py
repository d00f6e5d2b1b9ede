"""The served version's metric on each window of a stream (docs/online.md, "The served
version's rows").

At the start of each window the online loop asks :class:`ServedScorer` which serving version
users get (the versioned root's ``LATEST``, docs/serving.md "Serving the latest model"; read
here, below the serving layer); when it changed,
the weights of the checkpoint that version was exported from are loaded into the model in
place through the checkpoint's sharded load (each rank its own shards, nothing gathered),
copied aside as a frozen copy of this rank's shards and dense weights, and the trained
weights put back. The window's samples are then evaluated twice: by the trained model and,
with the frozen copy swapped in, by the served version, with the same metrics. Legend: R
rows of a rank's table shard, D embedding dim.

Which version a window was scored with is decided on rank 0 and written, before the window
is evaluated, to ``<run_dir>/served.jsonl`` (one line a window, fsynced); a run resumed after
a kill takes the recorded choice for the windows it runs again, so its rows are the killed
run's, and the version served at the checkpoint is in ``online.json`` (``served``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hstu.training import checkpoint as ckpt
from hstu.training.checkpoint import EMA_TABLES_KEY, CheckpointError
from hstu.training.distributed import broadcast_object
from hstu.training.report import SERVED_PREFIX

__all__ = ["SERVED_PREFIX", "ServedScorer", "ServedVersion", "ServedWeights"]

LOG_FILE = "served.jsonl"
POINTER = "LATEST"  # hstu.serving.versions.POINTER (the serving layer sits above this one)
_VERSION = re.compile(r"^v(\d+)$")
_SWAP_ROWS = 4096


@dataclass(frozen=True)
class ServedVersion:
    """A serving version and what scoring it needs: the checkpoint it was exported from,
    the windows that checkpoint had trained on, and its catalogue (the items the stream knew
    then: dense ids 1..known_items)."""

    name: str
    step: int
    checkpoint: str
    windows: int
    known_items: int

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ServedVersion | None:
        return None if d is None else cls(**d)


# ------------------------------------------------------------------------------ the weights
def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchanges the values of two tensors of one shape and dtype in place, a chunk of rows
    through a temporary at a time."""
    a2, b2 = (t.view(t.shape[0], -1) if t.dim() else t.view(1, 1) for t in (a, b))
    for lo in range(0, a2.shape[0], _SWAP_ROWS):
        tmp = a2[lo:lo + _SWAP_ROWS].clone()
        a2[lo:lo + _SWAP_ROWS].copy_(b2[lo:lo + _SWAP_ROWS])
        b2[lo:lo + _SWAP_ROWS].copy_(tmp)


class ServedWeights:
    """A frozen copy of the served checkpoint's weights as this rank holds them: its local
    table shards ([R, D] each) and the dense children's tensors. No optimizer state."""

    def __init__(self, model: torch.nn.Module, task: str, network: Any) -> None:
        self.model, self.task, self.network = model, task, network
        self.frozen: list[torch.Tensor] | None = None
        self.loaded: str | None = None
        """The checkpoint folder ``frozen`` holds (None: nothing loaded)."""

    def _tables(self) -> dict[str, Any]:
        """Live views of the table weights (not their optimizer states)."""
        from hstu.embeddings import embedding_state_dict
        from hstu.training.ema import is_table_weight

        return {k: v for k, v in embedding_state_dict(self.model).items() if is_table_weight(k)}

    def _dense(self) -> dict[str, torch.nn.Module]:
        from hstu.training.checkpoint_manager import DenseState

        return DenseState(self.model, None).children()

    def _live(self) -> list[torch.Tensor]:
        tables = [t for v in self._tables().values() for t in ckpt.state_tensors(v)]
        dense = [v for child in self._dense().values() for v in child.state_dict().values()
                 if isinstance(v, torch.Tensor)]
        return tables + dense

    @torch.no_grad()
    def load(self, folder: str) -> None:
        """The weights of checkpoint ``folder`` into the frozen copy (collective): loaded into
        the model in place (DCP, each rank its shards), then exchanged with the trained
        weights kept aside meanwhile. On any problem the trained weights are put back and
        CheckpointError is raised (one line)."""
        from hstu.training.checkpoint_manager import DenseState, network_differences

        live = self._live()
        if self.frozen is None or len(self.frozen) != len(live):
            self.frozen = [t.detach().clone() for t in live]
        else:
            for f, t in zip(self.frozen, live):
                f.copy_(t)
        self.loaded = None  # ``frozen`` holds the trained weights until the swap below
        try:
            ckpt.verify(folder)
            meta = ckpt.read_meta(folder)
            if meta.get("task") != self.task:
                raise CheckpointError(f"{folder} is a {meta.get('task')} run, this is {self.task}")
            changed = network_differences(meta.get("network"), self.network)
            if changed:
                raise CheckpointError(f"{folder} was trained with other NetworkArgs "
                                      f"({', '.join(changed)})")
            averaged = bool(meta.get("ema"))  # what hstu.export serves: the weight average
            ckpt.load_sharded(folder, {EMA_TABLES_KEY if averaged else "embeddings":
                                       self._tables()}, allow_unused=True)
            saved = ckpt.read_dense(folder, [0])[0]
            weights = ({c: {**saved["model"][c], **saved["ema"].get(c, {})}
                        for c in saved["model"]} if averaged else saved["model"])
            DenseState(self.model, None).load_weights(weights, folder)
        except CheckpointError:
            for f, t in zip(self.frozen, live):
                t.copy_(f)
            self.frozen = None
            raise
        for f, t in zip(self.frozen, live):
            _swap(t, f)
        self.loaded = folder

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The served weights in the model for the duration; the trained ones after (the
        same values, exchanged in place)."""
        assert self.frozen is not None and self.loaded is not None
        live = self._live()
        with torch.no_grad():
            for f, t in zip(self.frozen, live):
                _swap(t, f)
        try:
            yield
        finally:
            with torch.no_grad():
                for f, t in zip(self.frozen, live):
                    _swap(t, f)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frozen or [])


# ------------------------------------------------------------------------------ the choice
class ServedLog:
    """Rank 0: which version each window was scored with, ``<run_dir>/served.jsonl``, one JSON
    line a window (``{"window", "version": {...} | null, "note"}``), appended and fsynced
    before the window is evaluated. A torn last line (a kill while writing it) is dropped."""

    def __init__(self, run_dir: str, resumed: bool) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.choices: dict[int, dict[str, Any]] = {}
        if not resumed:  # a fresh run: an earlier run's choices are not this one's
            self.path.unlink(missing_ok=True)
            return
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    break  # written when the run was killed: that window was not evaluated
                raise CheckpointError(f"{self.path}:{i + 1}: not a JSON line; remove the file "
                                      "to score the windows a resume runs again anew") from None
            self.choices.setdefault(int(entry["window"]), entry)

    def record(self, window: int, version: ServedVersion | None, note: str | None) -> None:
        entry = {"window": window, "version": None if version is None else asdict(version),
                 "note": note}
        self.choices[window] = entry
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def served_name(root: Path) -> str | None:
    """The version ``root``'s pointer names (None: nothing published yet); a pointer that
    holds no version name -> CheckpointError (one line)."""
    try:
        text = (root / POINTER).read_text()
    except FileNotFoundError:
        return None
    if _VERSION.match(text.strip()) is None:
        raise CheckpointError(f"{root / POINTER}: holds {text[:40]!r}, not a version name")
    return text.strip()


def checkpoint_version(root: Path, name: str) -> tuple[ServedVersion | None, str]:
    """(version ``name`` of ``root``, "") when the checkpoint its manifest names (hstu.export
    writes ``checkpoint``: path and step) is a complete online checkpoint, else (None, why)."""
    try:
        recorded = json.loads((root / name / "manifest.json").read_text())["checkpoint"]
        step, path = int(recorded["step"]), Path(recorded["path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, (f"{root / name / 'manifest.json'} names no checkpoint "
                      f"({type(exc).__name__}: {exc})")
    folder = str(path)
    if ckpt.manifest_of(folder) is None:
        return None, f"its checkpoint {folder} is gone or incomplete"
    try:
        windows = int(json.loads((path / "online.json").read_text())["windows"])
        known = int(json.loads((path / "stream.json").read_text())["num_items"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"its checkpoint {folder} is not an online one ({type(exc).__name__}: {exc})"
    return ServedVersion(name, step, str(path.resolve()), windows, known), ""


class ServedScorer:
    """Per window: the version to score (the same on every rank), its weights loaded when it
    changed. ``root``: the versioned serving root; ``current``: the version scored at the
    checkpoint resumed from (``online.json``), None on a fresh run."""

    def __init__(self, weights: ServedWeights, root: str, run_dir: str, rank: int,
                 resumed: bool, current: ServedVersion | None,
                 say: Callable[[str], None]) -> None:
        self.weights, self.root, self.rank, self.say = weights, Path(root), rank, say
        self.log = ServedLog(run_dir, resumed) if rank == 0 else None
        self.current = current
        self._said: set[str] = set()

    def _once(self, key: str, line: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(line)

    def _decide(self, window: int) -> tuple[ServedVersion | None, str | None]:
        """Rank 0: (the version window ``window`` is scored with, a note when none or why it
        is not the one LATEST names)."""
        try:
            name = served_name(self.root)
        except CheckpointError as exc:
            self._once(f"pointer-{exc}", f"[hstu] WARNING: served version: {exc}; no served_* "
                       "rows while it is so")
            return None, str(exc)
        if name is None:
            self._once("none", f"[hstu] served version: nothing is served in {self.root} yet: "
                       "no served_* rows until a version is published")
            return None, "nothing served"
        if self.current is not None and name == self.current.name:
            return self.current, None
        version, why = checkpoint_version(self.root, name)
        if version is None:
            self._once(name, f"[hstu] WARNING: served version {name} of {self.root} cannot be "
                       f"scored: {why}; no served_* rows while it is served")
            return None, why
        if version.windows >= window:
            # a run resumed behind the publisher: this version trained on this very window
            note = (f"{name} was exported after window {version.windows}, not before window "
                    f"{window} (a run resumed behind its publisher)")
            self._once(f"future-{name}", f"[hstu] served version: {note}: the windows before "
                       f"window {version.windows + 1} keep "
                       + (self.current.name if self.current else "no served version"))
            return self.current, note
        return version, None

    def choose(self, window: int) -> ServedVersion | None:
        """The version window ``window`` is scored with (collective; None: no served rows),
        its weights loaded. The choice recorded for it by a run that was killed is kept."""
        choice: dict[str, Any] | None = None
        if self.log is not None:
            entry = self.log.choices.get(window)
            if entry is None:
                version, note = self._decide(window)
                self.log.record(window, version, note)
                entry = self.log.choices[window]
            choice = entry["version"]
        version = ServedVersion.from_dict(broadcast_object(choice))
        if version is not None and version != self.current:
            try:
                self.weights.load(version.checkpoint)
            except CheckpointError as exc:
                self._once(f"load-{version.name}",
                           f"[hstu] WARNING: served version {version.name} cannot be scored: "
                           f"{exc}; no served_* rows while it is served")
                return None
            self.say(f"[hstu] served version: {version.name} (checkpoint "
                     f"{Path(version.checkpoint).name}, after window {version.windows}, "
                     f"{version.known_items} items) is scored from window {window} on "
                     f"({self.weights.nbytes() / 2**20:.1f} MiB of weights on this rank)")
        elif version is not None and self.weights.loaded is None:
            self.weights.load(version.checkpoint)  # resumed: the checkpoint's served version
        self.current = version if version is not None else self.current
        return version

    def pinned(self, windows_done: int) -> set[str]:
        """Rank 0: the checkpoints of the version scored now and of those recorded for the
        windows after ``windows_done`` (a resume scores them again): not to be pruned."""
        out = {self.current.checkpoint} if self.current is not None else set()
        if self.log is not None:
            out.update(e["version"]["checkpoint"] for w, e in self.log.choices.items()
                       if w > windows_done and e["version"] is not None)
        return out

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.current is None else asdict(self.current)
