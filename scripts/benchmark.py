"""Same as ``python -m hstu.bench`` (see hstu/bench.py): one run, a table and a JSON file."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hstu.bench import main

if __name__ == "__main__":
    main()
