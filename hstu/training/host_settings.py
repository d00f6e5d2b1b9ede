"""The process-wide host settings of a training process, in one place: each read here from
one environment variable (:class:`HostSettings`, a field per variable), applied by
:func:`hstu.training.distributed.init_distributed`, :mod:`hstu.training.cpu_placement` and
:mod:`hstu.training.host_memory`, which read them from here (this module imports neither).
They change how a process uses its host, never a value it computes; docs/training.md
("Host settings") gives each variable, its default and its effect.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from hstu.validation import ConfigError

_MAX_BACKOFF_S = 300.0


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip()
    if not value:
        return default
    if value not in ("0", "1"):
        raise ConfigError(f"{name}={value!r}", None, "must be 0 or 1 (environment variable)")
    return value == "1"


def _number(env: Mapping[str, str], name: str, default: float, kind: type) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(
            f"{name}={value!r}", None, f"must be {what} (environment variable)"
        ) from None


@dataclass(frozen=True)
class HostSettings:
    """How this process uses its host (see the module docstring)."""

    pin_ranks: bool = True
    """HSTU_PIN_RANKS: each local rank on its own cores (CPU runs; only when safe)."""
    feed_nice: int = 19
    """HSTU_FEED_NICE: niceness of the data thread on CPU runs (0 leaves it)."""
    keep_freed_host_memory: bool = True
    """HSTU_KEEP_FREED_HOST_MEMORY: glibc keeps freed large host buffers for reuse."""
    restart_backoff_s: float = 0.0
    """HSTU_RESTART_BACKOFF_S: wait before restart k joins: this * 2**(k-1), at most 300 s."""
    cpu_claims_file: str = os.path.join(tempfile.gettempdir(), "hstu-cpu-claims")
    """HSTU_CPU_CLAIMS_FILE: the per-host file where pinned jobs claim their cores."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HostSettings:
        """The settings of ``env`` (default: this process's environment); a malformed value
        raises a one-line ConfigError naming the variable (the entry points read them before
        ``--check-config`` answers)."""
        env = os.environ if env is None else env
        default = cls()
        return cls(
            pin_ranks=_flag(env, "HSTU_PIN_RANKS", default.pin_ranks),
            feed_nice=int(_number(env, "HSTU_FEED_NICE", default.feed_nice, int)),
            keep_freed_host_memory=_flag(
                env, "HSTU_KEEP_FREED_HOST_MEMORY", default.keep_freed_host_memory
            ),
            restart_backoff_s=_number(
                env, "HSTU_RESTART_BACKOFF_S", default.restart_backoff_s, float
            ),
            cpu_claims_file=env.get("HSTU_CPU_CLAIMS_FILE") or default.cpu_claims_file,
        )

    def restart_wait_s(self, restart_count: int) -> float:
        """Seconds attempt ``restart_count`` (0: the first) waits before it joins."""
        if restart_count <= 0 or self.restart_backoff_s <= 0:
            return 0.0
        return min(self.restart_backoff_s * 2 ** (restart_count - 1), _MAX_BACKOFF_S)


__all__ = ["HostSettings"]
