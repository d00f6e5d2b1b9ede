"""``python -m hstu.data.stream reingest <stream folder> <quarantined name> [--as NEW_NAME]``:
puts a quarantined partition back for the stream to read once (docs/online.md, "Re-ingesting a
quarantined partition"). Exit codes: 0 done, 1 it cannot be put back (one line says why), 2 a
usage error."""

from __future__ import annotations

import argparse
import sys

from hstu.data.errors import DataError
from hstu.data.stream.folder import QUARANTINE, reingest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.data.stream",
        description="Tools for a stream folder of online training (docs/online.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    put_back = commands.add_parser(
        "reingest",
        help="put a quarantined partition back, to be read once even though the stream passed "
        "its name",
        description="Moves a partition (fixed) from the quarantine back into the stream folder "
        "with a _REINGEST marker: the stream reads it at its next partition even though its name "
        "sorts before the stream's position, and once only.",
    )
    put_back.add_argument("stream", help="the stream folder (StreamArgs.path)")
    put_back.add_argument("name", help="the partition's folder name in the quarantine")
    put_back.add_argument("--as", dest="new_name", default=None, metavar="NEW_NAME",
                          help="its name in the stream folder (default: NAME)")
    put_back.add_argument("--quarantine", default=None, metavar="DIR",
                          help=f"the quarantine folder (StreamArgs.quarantine_dir; default "
                          f"<stream>/{QUARANTINE})")
    args = parser.parse_args(argv)
    try:
        dest = reingest(args.stream, args.name, args.new_name, args.quarantine)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"re-ingested {args.name} as {dest}: the stream reads it at its next partition")
    return 0


if __name__ == "__main__":
    sys.exit(main())
