"""Plain progress lines for logs: paced by KORET_LOG_INTERVAL, always a final line, count/rate/ETA."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from koret.report import PlainProgress


def _lines(interval: str, monkeypatch, steps: int = 5) -> list[str]:
    monkeypatch.setenv("KORET_LOG_INTERVAL", interval)
    out = io.StringIO()
    with PlainProgress(Console(file=out, width=200), disabled=False) as bar:
        task = bar.add_task("encode passages", total=steps * 10, unit="texts")
        for _ in range(steps):
            bar.update(task, advance=10)
    return out.getvalue().splitlines()


def test_a_line_per_update_at_interval_zero(monkeypatch):
    lines = _lines("0", monkeypatch)
    assert len(lines) == 5
    assert re.fullmatch(r"encode passages: 10/50 \(20%\), [\d.e+,-]+ texts/s, elapsed 0:00:00, ETA \d:\d\d:\d\d",
                        lines[0]), lines[0]
    assert lines[-1].startswith("encode passages: 50/50 (100%)")


def test_long_interval_still_writes_the_final_line(monkeypatch):
    lines = _lines("3600", monkeypatch)
    assert len(lines) == 1 and lines[0].startswith("encode passages: 50/50 (100%)")


def test_unfinished_task_gets_a_closing_line(monkeypatch):
    monkeypatch.setenv("KORET_LOG_INTERVAL", "3600")
    out = io.StringIO()
    with PlainProgress(Console(file=out, width=200), disabled=False) as bar:
        task = bar.add_task("search", total=100, unit="queries")
        bar.update(task, advance=30)
    assert out.getvalue().startswith("search: 30/100 (30%)")


def test_info_lines_are_whole_lines_off_a_terminal(tmp_path):
    """Logs (nohup, SLURM, CI) are grepped by line: a long info line and a table row are never wrapped."""
    import subprocess
    import sys

    long_path = "/data/" + "가" * 60 + "/" + "x" * 80 + ".jsonl"
    script = ("from koret.report import info, table, show\n"
              f"info('data {long_path}: 413 queries, 413 (query, positive) rows, 59 passages')\n"
              f"show(table('t', ['file', 'rows'], [['{long_path}', '413']]))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COLUMNS", "TTY_COMPATIBLE")}
    env["FORCE_COLOR"] = "1"  # colors in a CI log are fine; wrapping is not
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert f"data {long_path}: 413 queries, 413 (query, positive) rows, 59 passages" in lines
    assert any(long_path in line and "413" in line for line in lines[1:]), r.stderr


@pytest.fixture
def loud():
    """Printing on, whatever an earlier test in this process left (a CLI test's --quiet sets it process-wide)."""
    from koret.report import is_quiet, set_quiet

    before = is_quiet()
    set_quiet(False)
    yield
    set_quiet(before)


def test_brackets_in_paths_print_as_they_are(capsys, loud):
    """Paths and names are text, not rich markup: "[v1]" vanished from an info line and "[/x]" raised
    MarkupError (an info line, a warning, a table's title and cells)."""
    from koret.report import info, show, table, warn

    info("runs/[v1]/pairs.jsonl: 3 rows", lead="data")
    warn("runs/[/x]/pairs.jsonl has no rows")
    show(table("koret: runs/[/x]", ["file", "rows"], [["runs/[v1]/[/x].jsonl", 3]]))
    err = capsys.readouterr().err
    assert "data runs/[v1]/pairs.jsonl: 3 rows" in err
    assert "warning: runs/[/x]/pairs.jsonl has no rows" in err
    assert "koret: runs/[/x]" in err and "runs/[v1]/[/x].jsonl" in err


def test_the_run_and_eval_tables_print_brackets_in_their_titles(capsys, loud):
    """koret run's table is titled with run.dir and koret eval's with the set's source: as rich markup a
    "[v1]" in them vanished and a "[/x]" raised MarkupError once every stage had run (in place of the table)."""
    from pathlib import Path

    from koret.evaluate import show_table
    from koret.pipeline import _show

    _show([{"stage": "eval", "status": "ran", "seconds": 1.0, "figure": "NDCG@10 0.5"}], Path("runs/[v1]/[/x]"))
    show_table([{"name": "base", "metrics": {"ndcg@10": 0.5}}, {"name": "[v2]", "metrics": {"ndcg@10": 0.75}}],
               "data/[v1]/[/x].jsonl")
    err = capsys.readouterr().err
    assert "koret run: runs/[v1]/[/x]" in err, err
    assert "koret eval: data/[v1]/[/x].jsonl" in err and "[v2]" in err, err
