"""cnnlab's version: read by the records a run writes (its checkpoint, summary and environment), so it lives
below every module that writes one, not in the package's __init__."""

__version__ = "0.1.0"
