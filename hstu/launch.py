"""torchrun with the endings a long run needs.

    python -m hstu.launch --standalone --nproc_per_node 2 --max-restarts 3 \\
        pretrain_gr_retrieval.py --gin-config-file configs/<preset>.gin

Takes torchrun's arguments unchanged and runs it in this process, then:

- a signal (SIGTERM from a scheduler, Ctrl-C) ends the launcher with 128 + the signal
  (143 for SIGTERM) and one line, where torchrun itself exits 1 with a traceback; the workers
  have saved a checkpoint by then (they stop at the next step boundary);
- a failed worker ends it with that worker's exit code and one line, where torchrun prints
  its ``ChildFailedError`` block (each worker has printed its own one-line error above);
- ``--restart-backoff S`` (ours, default 0): with ``--max-restarts``, the workers of restart
  n wait ``min(S * 2**(n-1), 300)`` seconds before joining (a crash loop does not spin).

Restarts resume by themselves: a worker started by a restart resumes from the newest complete
checkpoint under ``TrainerArgs.ckpt_save_dir`` when saving is on (as ``ckpt_load_dir="auto"``).
"""

from __future__ import annotations

import os
import sys


def _pop_backoff(argv: list[str]) -> tuple[list[str], float]:
    out, backoff, i = [], 0.0, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--restart-backoff" and i + 1 < len(argv):
            backoff = float(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--restart-backoff="):
            backoff = float(arg.split("=", 1)[1])
        else:
            out.append(arg)
        i += 1
    return out, backoff


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv, backoff = _pop_backoff(list(sys.argv[1:] if argv is None else argv))
    if backoff > 0:
        os.environ["HSTU_RESTART_BACKOFF_S"] = str(backoff)
    args = parse_args(argv)
    try:
        run(args)
    except SignalException as exc:
        code = 128 + int(exc.sigval)
        print(
            f"[hstu.launch] stopped by {exc.sigval.name}; exit {code}", file=sys.stderr, flush=True
        )
        return code
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        # a worker's own exit code (2 config, 3 checkpoint, 4 non-finite), not the signal
        # torchrun stopped the others with; whichever rank happened to end first
        codes = [f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0]
        code = codes[0] if codes else 1
        ranks = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in failures)
        print(
            f"[hstu.launch] {exc.name} failed ({ranks})",
            file=sys.stderr,
            flush=True,
        )
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
