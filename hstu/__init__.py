"""hstu: distributed HSTU trainer for generative recommendation."""

import time as _time

__version__ = "0.1.0"

STARTED = _time.monotonic()
"""When this process first imported hstu (an entry point's first import): a run's
TrainerArgs.time_budget_minutes counts from here, its imports and set-up included."""
