"""What the user sees: the rich console, progress bars with rate and ETA, summary tables and plots.

Stages print through :func:`console` and wrap long work in :func:`progress`; ``--quiet`` (or a non-main
process in a multi-process run) silences both. Plots are written with matplotlib's Agg backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

_state = {"quiet": False}
_console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"] or _is_non_main_process()


def _is_non_main_process() -> bool:
    return os.environ.get("RANK", "0") not in ("", "0")


def console() -> Console:
    return _console


def info(message: str) -> None:
    if not is_quiet():
        _console.print(message, highlight=False)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet (on the main process)."""
    if not _is_non_main_process():
        _console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


class _Rate(TextColumn):
    """Items per second, with the unit of the task (texts/s, queries/s...)."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    """A rich Progress with description, bar, count, rate and ETA; disabled when quiet."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_console,
        disable=is_quiet(),
        transient=False,
    )
    with bar:
        yield bar


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    return t


def show(renderable: Any) -> None:
    if not is_quiet():
        _console.print(renderable)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.001 <= abs(value) < 100_000:
            return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plot_score_distributions(path: str | Path, positive: Sequence[float], negative: Sequence[float],
                             title: str) -> None:
    """Histogram of positive vs chosen-negative teacher scores, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from koret.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = 60
    if len(positive):
        ax.hist(positive, bins=bins, alpha=0.6, label=f"positives (n={len(positive):,})", color="#2a9d8f", density=True)
    if len(negative):
        ax.hist(negative, bins=bins, alpha=0.6, label=f"chosen negatives (n={len(negative):,})", color="#e76f51",
                density=True)
    ax.set_xlabel("teacher score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
