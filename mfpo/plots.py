"""A headless matplotlib figure and its PNG bytes, the same bytes for the same figure on every rebuild (no
timestamp, no software tag): what the dataset card, the eval report and the training card draw with."""

from __future__ import annotations

import io
from typing import Any


def figure(height: float = 3.2, width: float = 6.4) -> Any:
    """(fig, ax) on the headless backend."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return fig, ax


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (closed after), the same bytes for the same figure on every rebuild."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version tag: same bytes on rebuild
    plt.close(fig)
    return buf.getvalue()
