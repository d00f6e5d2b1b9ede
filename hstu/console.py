"""What a run prints: a quiet start (known harmless third-party warnings go to the run
directory's log, not the console) and one line per error, also under torchrun.

Quiet start: :func:`quiet_start` (called by the entry points before the heavy imports)
diverts the warnings in :data:`KNOWN_WARNINGS` from the console into a buffer;
:func:`keep_log` writes the buffer, and every later diverted warning, to
``<run_dir>/third_party_warnings.log`` (rank 0; the other ranks' copies are dropped). Any other
warning still reaches the console.

One line per error: :func:`fail` prints ``error: <message>`` once per node (the first worker
of the node to fail; torchrun stops the others, often before they reach it).
Under torchrun the launcher then prints its own ``ChildFailedError`` report (a traceback
and a table) after the worker has exited; so that the user's last line is still the error,
the worker leaves a tiny detached process that waits for the launcher to exit and then
prints the same line again.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from typing import Any, TextIO

# (where it comes from, message pattern). "warnings": a Python warning (warnings.warn);
# otherwise the name of the logger that emits it.
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    # megatron-core imports, on hosts without Transformer Engine / Apex: harmless, the trainer
    # uses neither (docs/install.md)
    ("warnings", r"Transformer Engine and Apex are not installed"),
    # TorchRec's planner: we build the topology ourselves (it does not fail) and the
    # storage-reservation heuristic is the one TorchRec's own planner uses by default
    ("torchrec.distributed.planner.types", r"The topology was constructed directly"),
    ("warnings", r"HeuristicalStorageReservation is known to cause issues"),
    ("torchrec.distributed.planner.storage_reservations", r"dense tensor size calculation"),
    # TorchRec's pipelines call torch.fx.is_fx_tracing (they mean the symbolic trace)
    ("torch.fx._symbolic_trace", r"is_fx_tracing will return true"),
    # hstu.training.ddp relies on broadcast_buffers=False (no buffer sync at init either)
    ("warnings", r"`broadcast_buffers` is deprecated"),
    # torch.distributed.checkpoint reading TorchRec's ShardedTensor tables (loading a
    # checkpoint: resume, best checkpoint, export); TorchRec, not hstu, would move to DTensor
    ("warnings", r"\APlease use DTensor instead and we are deprecating ShardedTensor\.\Z"),
)
LOG_FILE = "third_party_warnings.log"


class _Sink:
    """Holds diverted lines until the run directory is known, then appends to its log."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.file: TextIO | None = None
        self.dropping = False

    def write(self, text: str) -> None:
        if self.dropping:
            return
        if self.file is not None:
            self.file.write(text.rstrip() + "\n")
            self.file.flush()
        else:
            self.lines.append(text.rstrip())

    def attach(self, path: str | None) -> None:
        if path is None:
            self.dropping = True
        else:
            self.file = open(path, "a")  # noqa: SIM115 - kept open for the run
            self.file.writelines(line + "\n" for line in self.lines)
            self.file.flush()
        self.lines.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_sink = _Sink()
_installed = False


class _Divert(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.pattern.search(message):
            _sink.write(f"{record.levelname}:{record.name}: {message}")
            return False
        return True


def quiet_start() -> None:
    """Diverts the known third-party warnings from the console (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    patterns = [re.compile(p) for origin, p in KNOWN_WARNINGS if origin == "warnings"]
    original = warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if any(p.search(str(message)) for p in patterns):
            _sink.write(warnings.formatwarning(message, category, filename, lineno, line))
            return
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    for origin, pattern in KNOWN_WARNINGS:
        if origin != "warnings":
            logging.getLogger(origin).addFilter(_Divert(re.compile(pattern)))


def keep_log(run_dir: str | None) -> None:
    """Sends the diverted warnings to ``<run_dir>/third_party_warnings.log`` (None: drop them,
    e.g. on ranks that do not write the run directory)."""
    _sink.attach(None if run_dir is None else os.path.join(run_dir, LOG_FILE))


def close_log() -> None:
    _sink.close()


# --------------------------------------------------------------------------------- errors

_WAITER = r"""
import os, select, sys, time
pid, line, claim = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    fd = os.pidfd_open(pid)
    select.select([fd], [], [], 600)
except (AttributeError, OSError):
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(0.05)
sys.stderr.write(line + "\n")
sys.stderr.flush()
if claim:
    try:
        os.remove(claim)
    except OSError:
        pass
"""


def _print_after_launcher(line: str, claim: str = "") -> bool:
    """A detached process prints ``line`` once torchrun (this worker's parent) has exited.
    False when that cannot be arranged (the caller then prints it itself)."""
    launcher = os.getppid()
    if launcher <= 1:
        return False
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-c", _WAITER, str(launcher), line, claim],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # torchrun stops its workers' process groups, not this
        )
    except OSError:
        return False
    return True


def _claim_path() -> str:
    name = f"hstu-error-{os.getppid()}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    return os.path.join(tempfile.gettempdir(), re.sub(r"[^A-Za-z0-9_.-]", "_", name))


def _claim_the_line(path: str) -> bool | None:
    """Under torchrun: True for the first worker of this node to fail (it prints the line),
    False for the others; None when the claim cannot be made (then local rank 0 prints).
    Any rank may fail first: the launcher stops the others, often before they reach here."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return None
    return True


def fail(message: str, code: int = 2) -> int:
    """Prints ``error: <message>`` (one line per node) and returns ``code``. Under torchrun
    the first worker of the node to fail prints it, after the launcher's own report (a worker
    cannot print after its launcher exits, so a detached process does; it then removes the
    claim), so it is the last line; without torchrun (one process) it is printed at once."""
    line = "error: " + " ".join(str(message).split())
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun
        path = _claim_path()
        claimed = _claim_the_line(path)
        if claimed is None:
            claimed, path = int(os.environ.get("LOCAL_RANK", "0")) == 0, ""
        if not claimed:
            return code
        if _print_after_launcher(line, path):
            return code
        if path:
            os.remove(path)
    elif int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return code
    print(line, file=sys.stderr, flush=True)
    return code


__all__ = [
    "KNOWN_WARNINGS", "LOG_FILE", "close_log", "fail", "format_bytes", "keep_log", "quiet_start",
]


def format_bytes(n: float) -> str:
    """Bytes in the unit that fits: 3.21 GiB, 12.0 MiB, 640 KiB, 12 B."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
