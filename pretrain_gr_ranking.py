"""Train an HSTU ranking model.

    torchrun --nproc_per_node N pretrain_gr_ranking.py --gin-config-file configs/<preset>.gin [--gin-param ...]

Also runs as a single plain `python` process.
"""

import sys

from hstu.cli import main

if __name__ == "__main__":
    sys.exit(main("ranking"))
