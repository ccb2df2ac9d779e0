"""Markdown reports with matplotlib (Agg) figures saved next to them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.runner import write_atomic


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


class Report:
    """Collects Markdown and figures; `write()` saves `<stem>.md` and `<stem>_<name>.png` files atomically."""

    def __init__(self, path: str | Path, title: str) -> None:
        self.path = Path(path)
        self.lines: list[str] = [f"# {title}", ""]
        self.figures: list[str] = []

    def text(self, text: str) -> None:
        self.lines += [text, ""]

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.lines.append("| " + " | ".join(headers) + " |")
        self.lines.append("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            self.lines.append(
                "| " + " | ".join(fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
            )
        self.lines.append("")

    def figure(self, name: str, fig: Any, caption: str = "") -> None:
        """Save a matplotlib figure as `<stem>_<name>.png` and link it."""
        import io

        import matplotlib.pyplot as plt

        file = self.path.with_name(f"{self.path.stem}_{name}.png")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        write_atomic(file, buf.getvalue())
        self.figures.append(str(file))
        self.lines += [f"![{caption or name}]({file.name})", ""]

    def write(self) -> Path:
        write_atomic(self.path, "\n".join(self.lines).rstrip() + "\n")
        return self.path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 20, range_: tuple | None = None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(list(values), bins=bins, range=range_, color="#4a7ab8", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    return fig


def bars(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str, horizontal: bool = False):
    plt = pyplot()
    n = max(len(labels), 1)
    if horizontal:
        fig, ax = plt.subplots(figsize=(6, 0.25 * n + 1))
        ax.barh(list(labels), list(values), color="#4a7ab8")
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * n), 3.2))
        ax.bar(list(labels), list(values), color="#4a7ab8")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=45)
    ax.set_title(title)
    return fig
