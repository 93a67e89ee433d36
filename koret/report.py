"""What the user sees: the rich console, progress bars with rate and ETA, summary tables and plots.

Stages print through :func:`console` and wrap long work in :func:`progress`; ``--quiet`` (or a non-main
process in a multi-process run) silences both. Plots are written with matplotlib's Agg backend.
"""

from __future__ import annotations

import contextlib
import os
import time
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
from rich.text import Text

_state = {"quiet": False}


def _on_terminal() -> bool:
    """stderr itself, not rich's guess: FORCE_COLOR / TTY_COMPATIBLE make rich treat a log file as a terminal
    (80 columns, live bars); colors in logs are still honoured off a terminal."""
    import sys

    return sys.stderr.isatty()


def _make_console() -> Console:
    """stderr; off a terminal (a log file, nohup, SLURM, CI) lines are never wrapped, so a log line is one line
    for grep, and tables are as wide as their content (rich renders nothing full-width here) unless COLUMNS says
    otherwise."""
    if _on_terminal():
        return Console(stderr=True)
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 1000
    return Console(stderr=True, soft_wrap=True, width=width)


_console = _make_console()


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"] or _is_non_main_process()


def _is_non_main_process() -> bool:
    return os.environ.get("RANK", "0") not in ("", "0")


def console() -> Console:
    return _console


def info(message: str, lead: str | None = None, style: str = "bold") -> None:
    """One line of progress; ``lead`` (e.g. "data") is printed before it in ``style``. The message is plain text,
    never rich markup: a path such as ``runs/[v1]/pairs.jsonl`` prints as it is (as markup its "[v1]" vanished and
    a "[/x]" raised MarkupError)."""
    if not is_quiet():
        line = Text.assemble((lead, style), *((" ", message) if message else ())) if lead else Text(message)
        _console.print(line, highlight=False)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet (on the main process); the message is plain text, as in :func:`info`."""
    if not _is_non_main_process():
        _console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)


class _Rate(TextColumn):
    """Items per second, with the unit of the task (texts/s, queries/s...)."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: Any) -> Any:  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def log_interval() -> float:
    """Seconds between plain progress lines off a terminal (``KORET_LOG_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("KORET_LOG_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PlainProgress:
    """Progress for logs (nohup, SLURM, CI): rich draws no live bar off a terminal, so this writes one plain line
    per task at most every :func:`log_interval` seconds, when a task finishes, and on :meth:`log` (training
    logs at every ``logging_steps``): ``name: 120/500 (24%), 35.2 texts/s, elapsed 0:00:04, ETA 0:00:11``."""

    def __init__(self, console: Console, disabled: bool) -> None:
        self.console = console
        self.disabled = disabled
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        for i, t in enumerate(self.tasks):
            if not t["finished"] and t["completed"] > t["start_completed"]:
                self._line(i)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.monotonic()
        self.tasks.append({"description": description, "total": total, "completed": completed,
                           "start_completed": completed, "started": now, "last": now, "finished": False,
                           "unit": fields.get("unit", "it")})
        return len(self.tasks) - 1

    def update(self, task: int, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None, total: float | None = None, **_: Any) -> None:
        t = self.tasks[task]
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        now = time.monotonic()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if (done and not t["finished"]) or now - t["last"] >= log_interval():
            t["finished"] = t["finished"] or done
            self._line(task)

    def log(self, task: int, extra: str = "") -> None:
        """Write the task's line now, with ``extra`` (e.g. the loss)."""
        self._line(task, extra)

    def _line(self, task: int, extra: str = "") -> None:
        t = self.tasks[task]
        now = time.monotonic()
        t["last"] = now
        if self.disabled:
            return
        elapsed = now - t["started"]
        done = t["completed"] - t["start_completed"]
        rate = done / elapsed if elapsed > 0 else 0.0
        total = t["total"]
        count = f"{t['completed']:,.0f}/{total:,.0f} ({100 * t['completed'] / total:.0f}%)" if total else \
            f"{t['completed']:,.0f}"
        eta = (total - t["completed"]) / rate if total and rate > 0 else None
        parts = [f"{t['description']}: {count}", *([extra] if extra else []),
                 f"{rate:,.3g} {t['unit']}/s", f"elapsed {_clock(elapsed)}", f"ETA {_clock(eta)}"]
        self.console.print(", ".join(parts), highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def progress() -> Iterator[Any]:
    """Progress with description, count, rate and ETA; disabled when quiet. A live rich bar on a terminal,
    plain lines at a steady pace otherwise (see :class:`PlainProgress`)."""
    if not _on_terminal():
        with PlainProgress(_console, disabled=is_quiet()) as plain:
            yield plain
        return
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
    """A table of plain text (paths and names with brackets print as they are, not as rich markup)."""
    from rich.markup import escape

    t = Table(title=escape(title), title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(escape(col), justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[Text(fmt(v)) for v in row])
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
                             title: str, calibration: dict[str, Any] | None = None) -> None:
    """Histogram of positive vs chosen-negative teacher scores, written atomically as PNG. With the teacher's
    ``calibration`` figures (:mod:`koret.calibration`, as in stats.json): the calibrated scale on the top axis and
    dashed lines at its 0 (the mean random pair) and 1 (the median positive)."""
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
    if calibration and calibration["positive_median"] > calibration["random_mean"]:
        zero, unit = calibration["random_mean"], calibration["positive_median"] - calibration["random_mean"]
        ax.axvline(zero, color="#555555", linestyle="--", linewidth=1, label="random pairs, mean (calibrated 0)")
        ax.axvline(zero + unit, color="#264653", linestyle="--", linewidth=1,
                   label="every row's positive, median (calibrated 1)")
        top = ax.secondary_xaxis("top", functions=(lambda s: (s - zero) / unit, lambda c: zero + c * unit))
        top.set_xlabel("calibrated score")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` on Linux. ``ru_maxrss`` is the fallback elsewhere; on Linux
    it would also carry the peak of the process that launched this one, which survives ``exec``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
