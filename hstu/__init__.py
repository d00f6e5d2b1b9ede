"""hstu: distributed HSTU trainer for generative recommendation."""

__version__ = "0.1.0"
