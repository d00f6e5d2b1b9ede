"""A random stand-in for KuaiRand-1K in its raw layout (cost only, never quality).

Kept for old commands; it is ``python -m hstu.data.synthesize --dataset kuairand-1k
--min-length 4200`` (every history long enough for configs/kuairand-1k_long_ranking.gin:
4,096 + 100 + 4), other options passed on:

    .venv/bin/python scripts/kuairand_standin.py --out /tmp/kuairand-1k-raw [--fraction F] [--seed 0]
    python -m hstu.data.preprocess --dataset kuairand-1k --raw /tmp/kuairand-1k-raw --out tmp_data/standin
"""

from __future__ import annotations

import sys

from hstu.data.synthesize import main

if __name__ == "__main__":
    given = sys.argv[1:]
    least = [] if any(a.startswith("--min-length") for a in given) else ["--min-length", "4200"]
    sys.exit(main(["--dataset", "kuairand-1k", *least, *given]))
