"""``koret run``: the whole chain mine -> filter -> train -> eval -> push from one config.

The file has a section per stage (``mine``, ``filter``, ``train``, ``eval``, ``push``; each with the schema of the
stage's own config, ``filter`` holding the filter keys) plus ``run.dir``. Every stage writes under
``<run.dir>/<stage>/`` and feeds the next by default: train reads the (re)filtered ``train.parquet`` and takes
mine's teacher as its guide, eval compares [base, trained], push uploads (or stages, ``push.dry_run``) the
trained ``final/`` with eval's metrics in the card.

A stage whose outputs exist with the same resolved config (its hash, which includes the upstream stages'
hashes, is recorded in ``<run.dir>/<stage>/.koret-stage.json``) is skipped; ``--force`` redoes it. A failed
stage stops the chain with its one-line error; rerunning resumes from there. The closing table goes to
``<run.dir>/summary.json`` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from koret import dist
from koret.config import (
    Section,
    config_hash,
)
from koret.errors import KoretError
from koret.io import fingerprint_paths, read_record, write_json
from koret.report import console, info, is_quiet
from koret.stages import STAGES as REGISTRY

STAGES = tuple(REGISTRY)


class RunSection(Section):
    dir: str = Field("runs/pipeline", description="Every stage writes under <run.dir>/<stage>/.")


PipelineConfig = create_model(  # one optional section per registered stage, in the chain's order
    "PipelineConfig", __base__=Section, __doc__="A koret run file: run.dir and a section per stage.",
    run=(RunSection, Field(default_factory=RunSection)),
    **{name: ((stage.section or stage.schema) | None, None) for name, stage in REGISTRY.items()},  # type: ignore[misc]
)


# --------------------------------------------------------------------------------------------- resolution


def resolve(cfg: Any, source: str) -> dict[str, Any]:
    """Each present stage's own config, with the chain's defaults filled in (outputs under run.dir): every
    registry entry's ``chain`` turns its section into the stage's config, seeing the upstream stages'."""
    root = Path(cfg.run.dir)
    out: dict[str, Any] = {}
    for name, stage in REGISTRY.items():
        section = getattr(cfg, name, None)
        if section is not None and stage.chain is not None:
            out[name] = stage.chain(section, out, root, source)
    return out


def _stage_hashes(stages: dict[str, Any]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    upstream = ""
    for name in STAGES:
        if name in stages:
            hashes[name] = config_hash({"stage": name, "config": stages[name].model_dump(mode="json"),
                                        "upstream": upstream})
            upstream = hashes[name]
    return hashes


# --------------------------------------------------------------------------------------------- stages


def select(present: list[str], start: str | None, until: str | None, only: str | None) -> list[str]:
    for flag, value in (("--from", start), ("--until", until), ("--only", only)):
        if value is not None and value not in STAGES:
            raise KoretError(f"{flag}: unknown stage {value!r}", f"one of {', '.join(STAGES)}")
        if value is not None and value not in present:
            raise KoretError(f"{flag}: the config has no {value!r} section", f"sections: {', '.join(present)}")
    if only:
        return [only]
    chosen = present
    if start:
        chosen = chosen[chosen.index(start):]
    if until:
        chosen = chosen[: chosen.index(until) + 1] if until in chosen else []
    return chosen


def run_pipeline(cfg: PipelineConfig, source: str = "config", start: str | None = None, until: str | None = None,
                 only: str | None = None, force: bool = False,
                 on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the chain; returns the summary (also ``<run.dir>/summary.json``). Raises the failing stage's error.

    Under ``accelerate launch`` / torchrun (or ``koret run --num-processes N``) every process runs this. Stages
    that use many processes (mine's encoding, train) run on all of them; filter, eval and push run on the main
    process while the others wait. The main process decides what is skipped, writes the stage records and
    ``summary.json``; after each stage the processes exchange their outcome, so a stage that fails on any
    process fails the run everywhere, with its one-line error on the main process.
    """
    root = Path(cfg.run.dir)
    stages = resolve(cfg, source)
    if not stages:
        raise KoretError(f"{source}: no stage section (mine, filter, train, eval, push)")
    hashes = _stage_hashes(stages)
    present = [s for s in STAGES if s in stages]
    chosen = select(present, start, until, only)
    main = dist.is_main()
    sync = dist.FileSync.start(root) if dist.world_size() > 1 else None
    rows: list[dict[str, Any]] = []
    failure: KoretError | None = None
    for name in present:
        if name not in chosen or failure is not None:
            rows.append({"stage": name, "status": "not selected" if name not in chosen else "not run",
                         "seconds": 0.0, "figure": ""})
            continue
        record_path = root / name / ".koret-stage.json"
        key = hashes[name] + ":" + _inputs_fingerprint(name, stages[name])
        skip_figure = _current(record_path, key, name, stages[name]) if main and not force else None
        if sync is not None:  # the main process's decision holds for every process
            skip_figure = sync.exchange({"skip": skip_figure})[0]["skip"]
        if skip_figure is not None:
            info(f"[bold]{name}[/bold]: skipped (outputs exist with the same config and inputs; --force redoes it)")
            rows.append({"stage": name, "status": "skipped", "seconds": 0.0, "figure": skip_figure})
            continue
        if on_stage:
            on_stage(name)
        info(f"[bold cyan]== {name} ==[/bold cyan]")
        started = time.perf_counter()
        outcome: dict[str, Any] = {"ok": True}
        stage = REGISTRY[name]
        try:
            if stage.multi_process:
                result = stage.call(stages[name])
            elif main:
                with dist.single_process():
                    result = stage.call(stages[name])
            else:
                result = None
            if main:
                outcome["figure"], outcome["details"] = stage.figure(stages[name], result)
        except KoretError as exc:
            outcome = {"ok": False, "error": str(exc), "rank": dist.rank()}
            failure = exc
        if sync is not None:
            every = sync.exchange(outcome)
            failed = next((o for o in every if not o["ok"]), None)
            if failed is not None and failure is None:
                failure = KoretError(f"process {failed['rank']}: {failed['error']}")
        seconds = time.perf_counter() - started
        if failure is not None:
            if main:
                record_path.unlink(missing_ok=True)
            rows.append({"stage": name, "status": "failed", "seconds": seconds, "figure": str(failure)})
            continue
        if main:
            write_json(record_path, {"hash": key, "status": "ran", "figure": outcome["figure"], "seconds": seconds,
                                     "details": outcome["details"]})
            rows.append({"stage": name, "status": "ran", "seconds": seconds, "figure": outcome["figure"]})
        else:
            rows.append({"stage": name, "status": "ran", "seconds": seconds, "figure": ""})
    summary = {"run_dir": str(root), "stages": rows, "ok": failure is None, "processes": dist.world_size()}
    if main:
        write_json(root / "summary.json", summary)
        _show(rows, root)
    if sync is not None:
        sync.exchange({"done": True})
        sync.close()
    if failure is not None:
        if not main:
            failure.shown_elsewhere = True  # the main process prints it; the CLI stays quiet here
        raise failure
    return summary


def _current(record_path: Path, key: str, name: str, cfg: Any) -> str | None:
    """The recorded key figure when the stage's outputs exist with the same config and inputs, else None."""
    record = read_record(record_path)
    if (record and record.get("hash") == key and record.get("status") == "ran"
            and all(p.exists() for p in REGISTRY[name].outputs(cfg))):
        return str(record.get("figure", ""))
    return None


def _inputs_fingerprint(name: str, cfg: Any) -> str:
    """What a stage reads from outside the run folder (its registry entry's inputs), so that a changed input
    file reruns it: content of files up to 64 MB, size and modification time of larger ones."""
    return fingerprint_paths([p for p in REGISTRY[name].inputs(cfg) if p])


def _show(rows: list[dict[str, Any]], root: Path) -> None:
    if is_quiet():
        return
    from rich.table import Table

    t = Table(title=f"koret run: {root}", title_justify="left", header_style="bold")
    for col, justify in (("stage", "left"), ("status", "left"), ("seconds", "right"), ("key figure", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    colors = {"ran": "green", "skipped": "cyan", "failed": "red"}
    for r in rows:
        c = colors.get(r["status"], "dim")
        t.add_row(r["stage"], f"[{c}]{r['status']}[/{c}]", f"{r['seconds']:.1f}", r["figure"])
    console().print(t)
