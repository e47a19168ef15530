"""Figures written to files (matplotlib without a display)."""

from __future__ import annotations

import io
from pathlib import Path

from cnnlab.runtime.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically, then free it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    pyplot().close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
