"""``koret run``: the whole chain mine -> filter -> train -> reranker -> eval -> push from one config.

The file has a section per stage (``mine``, ``filter``, ``train``, ``reranker``, ``eval``, ``push``: the registry in
:mod:`koret.stages`; each with the schema of the stage's own config, ``filter`` holding the filter keys) plus
``run.dir``. Every stage writes under
``<run.dir>/<stage>/`` and feeds the next by default: train reads the (re)filtered ``train.parquet`` and takes
mine's teacher as its guide, eval compares [base, trained], push uploads (or stages, ``push.dry_run``) the
trained ``final/`` with eval's metrics in the card.

``run.rounds: N`` repeats mine -> filter -> train N times: round r > 1 mines again with round r-1's trained model
as the teacher, filters by the same rule and trains again (from round r-1's model, or from the base model:
``run.round_start``), writing under ``<run.dir>/round-<r>/<stage>/``; its steps are named ``round-<r>/<stage>``
(round 1 keeps ``<stage>`` and today's layout). reranker, eval and push come once, after the last round.

A step whose outputs exist with the same resolved config, input files and models (its key: the config's hash,
which includes the upstream steps' hashes, and fingerprints of the data files and model folders it reads, is
recorded in ``<run.dir>/<step>/.koret-stage.json``) is skipped; ``--force`` redoes it. A failed
step stops the chain with its one-line error; rerunning resumes from there. The closing table goes to
``<run.dir>/summary.json`` too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model

from koret import dist
from koret.config import (
    Section,
    config_hash,
)
from koret.errors import KoretError
from koret.io import fingerprint_paths, read_record, write_json
from koret.report import console, info, is_quiet
from koret.stages import REGISTRY, ROUND_STAGES, Stage, chain_round, round_root

CHAIN = tuple(REGISTRY)  # the stages in the order koret run chains them


class RunSection(Section):
    dir: str = Field("runs/pipeline", description="Every stage writes under <run.dir>/<stage>/.")
    rounds: int = Field(1, ge=1, description="Rounds of mine -> filter -> train: each round after the first mines "
                                             "again with the previous round's trained model as the teacher, "
                                             "filters by the same rule and trains again, under "
                                             "<run.dir>/round-<r>/<stage>/ (steps round-<r>/mine ...); reranker, "
                                             "eval and push follow the last round. Needs mine and train sections.")
    round_start: Literal["trained", "base"] = Field(
        "trained", description="What each round after the first trains from: trained: the previous round's model "
                               "(training goes on); base: train.model again (a fresh start on the new negatives).")


PipelineConfig = create_model(  # one optional section per registered stage, in the chain's order
    "PipelineConfig", __base__=Section, __doc__="A koret run file: run.dir and a section per stage.",
    run=(RunSection, Field(default_factory=RunSection)),
    **{name: ((stage.section or stage.schema) | None, None) for name, stage in REGISTRY.items()},  # type: ignore[misc]
)


# --------------------------------------------------------------------------------------------- resolution


def step_name(stage: str, r: int) -> str:
    """A step of the run: the stage's name in round 1 and after the rounds, ``round-<r>/<stage>`` in round r > 1
    (also its folder under run.dir)."""
    return stage if r == 1 else f"{round_root(Path(), r).as_posix()}/{stage}"


def stage_of(step: str) -> str | None:
    """The stage a step name runs (``round-2/train``: train), or None when it names no step."""
    head, _, stage = step.rpartition("/")
    if not head:
        return step if step in CHAIN else None
    r = head.removeprefix("round-")
    known = stage in ROUND_STAGES and r.isdigit() and int(r) > 1 and step_name(stage, int(r)) == step
    return stage if known else None


def resolve(cfg: Any, source: str) -> dict[str, Any]:
    """Each step's own config, in the order they run, with the chain's defaults filled in (outputs under run.dir):
    every registry entry's ``chain`` turns its section into the stage's config, seeing the upstream stages' (for
    rounds after the first, :func:`koret.stages.chain_round`)."""
    _check_rounds(cfg, source)
    root = Path(cfg.run.dir)
    steps: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name in CHAIN:
        if name not in ROUND_STAGES and "rounds" not in out:  # round 1 is chained: the later rounds, then the rest
            out = _later_rounds(cfg, out, steps, root, source)
        section, stage = getattr(cfg, name, None), REGISTRY[name]
        if section is not None and stage.chain is not None:
            out[name] = steps[name] = stage.chain(section, out, root, source)
    return steps


def _later_rounds(cfg: Any, first: dict[str, Any], steps: dict[str, Any], root: Path, source: str) -> dict[str, Any]:
    """Rounds 2..run.rounds after round 1's configs (``first``), added to ``steps``; returns what the stages after
    the rounds see: the last round's mine, filter and train, and every round's under "rounds"."""
    sections = {s: getattr(cfg, s, None) for s in ROUND_STAGES}
    done = [first]
    for r in range(2, cfg.run.rounds + 1):
        done.append(chain_round(sections, done[-1], root, r, cfg.run.round_start, source))
        steps.update({step_name(s, r): c for s, c in done[-1].items()})
    return {**done[-1], "rounds": done}


def _check_rounds(cfg: Any, source: str) -> None:
    """What several rounds need, checked before anything runs (run.rounds >= 1 is the schema's)."""
    rounds = cfg.run.rounds
    if rounds == 1:
        return
    missing = [s for s in ("mine", "train") if getattr(cfg, s, None) is None]
    if missing:
        raise KoretError(f"{source}: run.rounds: {rounds} rounds need a mine and a train section (each round "
                         f"mines with the previous round's model and trains on that); no {' or '.join(missing)}",
                         f"add a {' and a '.join(missing)} section, or set run.rounds: 1")
    data = cfg.train.data
    sources = getattr(data, "sources", None) or []
    if data.train or (sources and all(s.train for s in sources)):
        key = "train.data.train is set" if data.train else "every train.data.sources entry sets its own train"
        raise KoretError(f"{source}: run.rounds: {rounds} rounds, but {key}, so no round would train on its own "
                         "mining", "leave train unset (train then reads the round's mined negatives), or set "
                         "run.rounds: 1")
    lora = getattr(cfg.train.model, "lora", None)
    if cfg.run.round_start == "trained" and lora is not None and not lora.merge:
        raise KoretError(f"{source}: run.round_start: trained starts round 2 from round 1's final/, which "
                         "train.model.lora.merge: false leaves a LoRA adapter, not a model to train on",
                         "set train.model.lora.merge: true (final/ then holds merged weights), or "
                         "run.round_start: base")


def _stage_hashes(stages: dict[str, Any]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    upstream = ""
    for name, cfg in stages.items():  # in the order the steps run
        hashes[name] = config_hash({"stage": name, "config": cfg.model_dump(mode="json"), "upstream": upstream})
        upstream = hashes[name]
    return hashes


# --------------------------------------------------------------------------------------------- stages


def select(present: list[str], start: str | None, until: str | None, only: str | None) -> list[str]:
    """The steps ``--from``, ``--until`` and ``--only`` choose among ``present`` (step names, in run order)."""
    for flag, value in (("--from", start), ("--until", until), ("--only", only)):
        if value is not None and stage_of(value) is None:
            raise KoretError(f"{flag}: unknown stage {value!r}",
                             f"one of {', '.join(CHAIN)}, or round-<r>/mine|filter|train for round r > 1")
        if value is not None and value not in present:
            what = "section" if value in CHAIN else "step (run.rounds, and a section for its stage)"
            raise KoretError(f"{flag}: the config has no {value!r} {what}", f"steps: {', '.join(present)}")
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
    """Run the chain's steps (each round's mine, filter and train, then reranker, eval and push); returns the
    summary (also ``<run.dir>/summary.json``). Raises the failing step's error.

    Under ``accelerate launch`` / torchrun (or ``koret run --num-processes N``) every process runs this. Stages
    that use many processes (mine, train, reranker) run on all of them; filter, eval and push run on the main
    process while the others wait for its decision on the next stage (:func:`koret.dist.agree`, one deadline:
    ``KORET_COLLECTIVE_TIMEOUT``). A process whose stage fails raises at once: its peers' collectives fail when
    it exits, or the launcher stops them, so one failure ends the run within a minute (seconds on gloo); the main
    process then writes the summary with the stage marked failed (and its record removed: nothing half-done counts
    as done).
    """
    root = Path(cfg.run.dir)
    stages = resolve(cfg, source)
    if not stages:
        raise KoretError(f"{source}: no stage section ({', '.join(CHAIN)})")
    hashes = _stage_hashes(stages)
    present = list(stages)  # step names, in the order they run
    chosen = select(present, start, until, only)
    rounds = cfg.run.rounds
    main = dist.is_main()
    if main:
        (root / "summary.json").unlink(missing_ok=True)  # a run in progress has no summary, a stale one lies
    dist.start_control()
    rows: list[dict[str, Any]] = []
    runs: list[str] = []  # the run ids of the stages above, as recorded: a stage that reran changes those below
    name, started = present[0], time.perf_counter()
    try:
        for name in present:
            started = time.perf_counter()
            record_path = root / name / ".koret-stage.json"
            if name not in chosen:
                rows.append({"stage": name, "status": "not selected", "seconds": 0.0, "figure": ""})
                runs.append(str((read_record(record_path) or {}).get("run_id", "")) if main else "")
                continue
            stage = REGISTRY[str(stage_of(name))]
            key = _key(stage, stages[name], hashes[name], runs) if main else ""
            skip = _current(record_path, key, stage, stages[name]) if main and not force else None
            skip = dist.agree(skip)  # the main process's decision holds for every process
            if skip is not None:
                info("skipped (outputs exist with the same config, inputs, models and upstream runs; --force "
                     "redoes it)", lead=f"{name}:")
                rows.append({"stage": name, "status": "skipped", "seconds": 0.0, "figure": skip["figure"]})
                runs.append(skip["run_id"])
                continue
            if on_stage:
                on_stage(name)
            info("", lead=f"== {name} ==", style="bold cyan")
            if main:
                record_path.unlink(missing_ok=True)  # a stage that starts is not done until it ends
            if stage.multi_process:
                result = stage.call(stages[name])
                dist.wait_for_all()  # done on every process before it is recorded as done
            elif main:
                with dist.single_process():
                    result = stage.call(stages[name])
            else:
                result = None
            seconds = time.perf_counter() - started
            figure, details = stage.figure(stages[name], result) if main else ("", {})
            run_id = uuid.uuid4().hex[:12]
            if main:
                write_json(record_path, {"hash": key, "status": "ran", "run_id": run_id, "figure": figure,
                                         "seconds": seconds, "details": details})
            rows.append({"stage": name, "status": "ran", "seconds": seconds, "figure": figure})
            runs.append(run_id)
        dist.wait_for_all()
    except BaseException as exc:  # koret's error, a peer that ended, the launcher's SIGTERM, a bug, Ctrl-C
        dist.ignore_stop()
        rows = [r for r in rows if r["stage"] != name]
        rows.append({"stage": name, "status": "failed", "seconds": time.perf_counter() - started,
                     "figure": _failure_figure(exc)})
        rows += [{"stage": n, "status": "not run" if n in chosen else "not selected", "seconds": 0.0,
                  "figure": ""} for n in present[present.index(name) + 1:]]
        if main:
            (root / name / ".koret-stage.json").unlink(missing_ok=True)
            _finish(root, rows, ok=False, rounds=rounds)
        raise
    summary = {"run_dir": str(root), "stages": rows, "ok": True, "processes": dist.world_size(), "rounds": rounds}
    if main:
        _finish(root, rows, ok=True, rounds=rounds)
    return summary


def _finish(root: Path, rows: list[dict[str, Any]], ok: bool, rounds: int) -> None:
    write_json(root / "summary.json", {"run_dir": str(root), "stages": rows, "ok": ok,
                                       "processes": dist.world_size(), "rounds": rounds})
    _show(rows, root)


def _failure_figure(exc: BaseException) -> str:
    """What the summary says about a failed stage: this process's own error, or, when it only saw another
    process end (a collective failed, the launcher stopped it), that process's error if it left a record."""
    if isinstance(exc, KoretError) and not isinstance(exc, (dist.PeerLost, dist.Stopped)):
        return str(exc)
    records = dist.read_failures()
    rank = dist.earliest_failure(records, "error")
    if rank is not None:
        return f"process {rank}: {records[rank]['message']}"
    if isinstance(exc, Exception) and not isinstance(exc, KoretError) and dist.is_peer_loss(exc):
        # a library's collective (DDP's all-reduce) whose peer was killed: it left no record, gloo's text is no cause
        return str(dist.PeerLost("a collective of this stage", exc))
    return str(exc) if isinstance(exc, KoretError) else f"{type(exc).__name__}: {exc}"


def _current(record_path: Path, key: str, stage: Stage, cfg: Any) -> dict[str, str] | None:
    """The recorded key figure and run id when the step's outputs exist with the same key, else None."""
    record = read_record(record_path)
    if (record and record.get("hash") == key and record.get("status") == "ran"
            and all(p.exists() for p in stage.outputs(cfg))):
        return {"figure": str(record.get("figure", "")), "run_id": str(record.get("run_id", ""))}
    return None


def _key(stage: Stage, cfg: Any, config_key: str, upstream_runs: list[str]) -> str:
    """What decides whether a stage is current: its resolved config (with the upstream configs), the data files
    it reads (content up to 64 MB, size and modification time of larger ones), the models it loads
    (:func:`koret.encode.model_identity`: a folder's weight and config files by size and modification time, a
    Hub id with its cached revision) and the run ids of the stages above it. A stage that reran (``--force
    --only train``) therefore reruns everything below it on the next ``koret run``, and a teacher re-trained at
    the same path reruns mine."""
    from koret.encode import model_identity

    models = "|".join(model_identity(m) for m in stage.models(cfg) if m and m not in ("teacher", "student"))
    return ":".join([config_key, fingerprint_paths([p for p in stage.inputs(cfg) if p]),
                     config_hash({"models": models}), *upstream_runs])


def _show(rows: list[dict[str, Any]], root: Path) -> None:
    if is_quiet():
        return
    from rich.markup import escape
    from rich.table import Table

    # run.dir, stage names and figures are text, not markup (a "[/x]" in run.dir raised MarkupError here)
    t = Table(title=escape(f"koret run: {root}"), title_justify="left", header_style="bold")
    for col, justify in (("stage", "left"), ("status", "left"), ("seconds", "right"), ("key figure", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    colors = {"ran": "green", "skipped": "cyan", "failed": "red"}
    for r in rows:
        c = colors.get(r["status"], "dim")
        # figures are text, not markup: an error's "[/path:line]" (gloo's) raised MarkupError here, in place of it
        t.add_row(escape(r["stage"]), f"[{c}]{r['status']}[/{c}]", f"{r['seconds']:.1f}", escape(r["figure"]))
    console().print(t)
