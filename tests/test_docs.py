"""The docs cannot drift from the code: README.md and docs/*.md are checked against the CLI and the config models.

What is checked (the rules a doc writer follows are in docs/development.md, "Writing docs"):

- every ``koret ...`` command line in a ``bash`` / ``sh`` / ``shell`` / ``console`` code block, every line of a
  ``text`` or unlabelled block that starts with ``koret `` or ``$ koret ``, and every inline code span that
  starts with ``koret ``, names a real command and only that command's options (read from the click objects of
  the Typer app, nothing is run); each ``--set key=value`` names a key of that command's schema, and a value of
  a key with fixed choices (a ``Literal``) is one of them; a ``-c`` file exists (unless it is a placeholder or
  under runs/, an earlier command's output) and is a config of that command's stage (a run file only with
  ``koret run``); ``--from`` / ``--until`` / ``--only`` name a stage;
- every ``python`` code block parses, and each ``from koret... import X`` names a module and an attribute that
  exist (read from the module's source: nothing is imported or run);
- every ``yaml`` code block is a whole config that ``koret config validate`` accepts, unless its first line is
  ``# fragment: STAGE``: then it is part of a STAGE config, validated against that schema alone;
- every inline code span that names a dotted config key (``filter.perc``, ``search.lexical.top_k: 50``) names a
  key of some command's schema, and every span naming a repository path (``koret/mine.py``) names one that exists;
- every relative link and anchor resolves (GitHub's heading slugs);
- no issue numbers (``#12``, ``(#12)``, ``issue 12``, ``.../issues/12``); docs/configuration.md is what ``koret config reference`` prints; the tables that scripts
  rewrite between markers hold what bench/results/ holds; README.md fits on a screen.

``test_checkers_report_what_a_rename_breaks`` feeds snippets with a renamed command, option, key, file, link,
anchor, import and choice into the checker functions and asserts each one is reported.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from helpers import REPO
from typer.testing import CliRunner

from koret.cli import EXAMPLES, app
from koret.config import load_yaml_text, validate
from koret.config_reference import key_annotation, key_exists, reference, schemas

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = ["mining", "scale-out", "training", "reranker", "evaluation", "pipeline", "configuration", "benchmarks",
         "quality", "troubleshooting", "development"]
COMMAND_BLOCKS = {"bash", "sh", "shell", "console"}
OUTPUT_BLOCKS = {"text", ""}  # output, tables, logs: only its lines that start with `koret ` / `$ koret ` run koret
SHELL_STOP = {">", ">>", "|", "||", "&&", ";", "&", "2>&1"}
FILE_SUFFIXES = {"parquet", "json", "jsonl", "yaml", "yml", "png", "py", "md", "tsv", "csv", "txt", "npy", "sh",
                 "safetensors", "bin", "toml"}
REPO_DIRS = ("koret/", "scripts/", "configs/", "tests/", "bench/", "samples/", "docs/")
ROOT_COMMAND = typer.main.get_command(app)


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --------------------------------------------------------------------------------------------- reading a doc


@dataclass
class Block:
    info: str
    text: str
    line: int  # of the first line inside the fence


def code_blocks(text: str) -> list[Block]:
    blocks, current, fence = [], None, ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            m = re.match(r"^(`{3,}|~{3,})\s*([^`]*)$", stripped)
            if m:
                fence, current = m.group(1), Block(m.group(2).strip(), "", n + 1)
        elif stripped.startswith(fence) and stripped.strip("`~") == "":
            blocks.append(current)
            current = None
        else:
            current.text += line + "\n"
    return blocks


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks and HTML comments."""
    out, in_fence, fence, in_comment = [], False, "", False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if in_fence:
            if stripped.startswith(fence) and stripped.strip("`~") == "":
                in_fence = False
            continue
        m = re.match(r"^(`{3,}|~{3,})", stripped)
        if m:
            in_fence, fence = True, m.group(1)
            continue
        if in_comment or stripped.startswith("<!--"):
            in_comment = "-->" not in stripped
            continue
        out.append((n, line))
    return out


def inline_spans(text: str) -> list[tuple[int, str]]:
    spans = []
    for n, line in prose(text):
        for m in re.finditer(r"(`+)(.+?)\1", line):
            spans.append((n, m.group(2).strip()))
    return spans


def command_lines(text: str) -> list[tuple[int, str]]:
    """Shell lines of the command blocks (continuations joined), the lines of text / unlabelled blocks that start
    with ``koret `` or ``$ koret `` (a diagram's indented ``koret mine ───`` and a printed title ``koret run: DIR``
    are not commands), and inline spans that start with ``koret ``."""
    out = []
    for block in code_blocks(text):
        kind = block.info.split(" ")[0].lower()
        if kind not in COMMAND_BLOCKS and kind not in OUTPUT_BLOCKS:
            continue
        pending, start = "", block.line
        for i, line in enumerate(block.text.splitlines()):
            if not pending:
                start = block.line + i
                if kind in OUTPUT_BLOCKS and (not line.startswith(("koret ", "$ koret "))
                                              or re.match(r"^koret [\w-]+:(\s|$)", line)):
                    continue  # not a command, or a title koret prints ("koret run: runs/quickstart")
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
    out += [(n, span) for n, span in inline_spans(text) if span.startswith("koret ")]
    return out


# --------------------------------------------------------------------------------------------- checkers


def koret_args(line: str) -> list[str] | None:
    """The arguments after ``koret`` (or ``-m koret``) on a shell line, up to a redirect or pipe; None when the
    line runs no koret command. Usage brackets (``[--resume]``) are dropped."""
    try:
        tokens = shlex.split(line.replace("…", " ... "), comments=True)
    except ValueError:
        return None if "koret" not in line else [f"<unbalanced quotes: {line}>"]
    for i, tok in enumerate(tokens):
        if tok == "koret" or tok.endswith("/koret"):
            rest = tokens[i + 1:]
            break
        if tok == "-m" and tokens[i + 1:i + 2] == ["koret"]:
            rest = tokens[i + 2:]
            break
    else:
        return None
    args = []
    for tok in rest:
        if tok in SHELL_STOP or tok.startswith((">", "2>")):
            break
        tok = tok.strip("[]")
        if tok:
            args.append(tok)
    return args


def _placeholder(value: str) -> bool:
    return value.isupper() or value in ("...", "…") or value.startswith("<") or "$" in value


def _stage_commands() -> dict[str, set[str]]:
    """command -> the stages whose config files it reads (``koret filter`` reads a mine config, or a filter one)."""
    from koret.stages import REGISTRY

    out = {stage.command: {stage.name} for stage in REGISTRY.values()}
    out["filter"] |= {"mine"}
    out["run"] = {"run"}
    return out


def _config_problems(where: str, command: str, config: str) -> list[str]:
    """A ``-c`` file: it exists, unless a placeholder or under runs/ (an earlier documented command writes it),
    and is a config of the command's stage."""
    from koret.cli import _stage_of
    from koret.errors import KoretError

    if _placeholder(config) or config.startswith(("runs/", "./runs/")):
        return []
    path = REPO / config
    if not path.is_file():
        return [f"{where}: -c {config}: no such file"]
    accepted = _stage_commands().get(command)
    if accepted is None:  # koret config ...: any stage
        return []
    try:
        stage = _stage_of(path, None)
    except KoretError as exc:
        return [f"{where}: -c {config}: {exc}"]
    if stage not in accepted:
        reads = "`koret run`" if stage == "run" else f"`koret {_command_of(stage)}`"
        return [f"{where}: -c {config} is a {stage} config, which {reads} reads, not `koret {command}`"]
    return []


def _command_of(stage: str) -> str:
    from koret.stages import get

    return get(stage).command


def _choices(annotation) -> list:
    """The values of the Literal types in ``annotation`` (``float | Literal['auto'] | None``: ['auto'])."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for a in typing.get_args(annotation) for v in _choices(a)]


def _value_problem(schema, key: str, raw: str) -> str | None:
    """``--set key=value`` for a key with fixed choices: the value (read as YAML, as koret reads it) must be valid."""
    from pydantic import TypeAdapter, ValidationError

    from koret.config import parse_override

    annotation = key_annotation(schema, key)
    choices = _choices(annotation) if annotation is not None else []
    if not choices or _placeholder(raw):
        return None
    _, value = parse_override(f"{key}={raw}")
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return f"--set {key}={raw}: not a valid value (choices: {', '.join(map(str, choices))})"
    return None


def _schema_for(path: list[str], values: dict[str, list[str]]):
    from koret.cli import _schema, _stage_of

    if path[:1] == ["config"]:
        stage = (values.get("stage") or [None])[0]
        config = (values.get("config") or [None])[0]
        if stage and not _placeholder(stage):
            return _schema(stage)
        if config and (REPO / config).is_file():
            return _schema(_stage_of(REPO / config, None))
        return None
    return schemas().get(path[0]) if path else None


def check_command(line: str) -> list[str]:
    """Problems of one shell line: an unknown command or option, a --set key the schema lacks, a missing
    configs/ file, an unknown stage; [] when the line is fine or runs no koret command."""
    args = koret_args(line)
    if args is None:
        return []
    if args and args[0].startswith("<unbalanced"):
        return [args[0]]
    cmd, path = ROOT_COMMAND, []
    while hasattr(cmd, "commands"):  # a group (typer vendors click: no isinstance against click's classes)
        if not args or args[0] == "--help":  # a group named alone (`koret config`), or its help
            return []
        if args[0].startswith("-"):
            return [f"`koret {' '.join(path)}`: no command given ({line.strip()})"]
        name = args.pop(0)
        sub = cmd.commands.get(name)
        if sub is None:
            return [f"`koret {' '.join(path + [name])}`: no such command (commands: {', '.join(cmd.commands)})"]
        cmd, path = sub, path + [name]
    options = {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts + p.secondary_opts}
    takes_arguments = any(p.param_type_name == "argument" for p in cmd.params)
    problems: list[str] = []
    values: dict[str, list[str]] = {}
    where = f"`koret {' '.join(path)}`"
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\d", tok):
            name, eq, value = tok.partition("=")
            if name == "--help":
                i += 1
                continue
            param = options.get(name)
            if param is None:
                problems.append(f"{where}: no option {name} (options: {', '.join(sorted(options))})")
            elif not (param.is_flag or param.count):
                if not eq:
                    if i + 1 >= len(args):
                        problems.append(f"{where}: option {name} needs a value")
                        break
                    value, i = args[i + 1], i + 1
                values.setdefault(param.name, []).append(value)
        elif not takes_arguments and tok not in ("...", "…"):  # an ellipsis stands for more of the same
            problems.append(f"{where}: unexpected argument {tok!r}")
        i += 1
    for config in values.get("config", []):
        problems += _config_problems(where, " ".join(path), config)
    for flag in ("from_", "until", "only"):
        from koret.pipeline import CHAIN, stage_of

        for stage in values.get(flag, []):  # a stage, or a later round's step (round-2/train)
            if not _placeholder(stage) and stage_of(stage) is None:
                problems.append(f"{where}: --{flag.rstrip('_')} {stage}: no such stage ({', '.join(CHAIN)})")
    schema = _schema_for(path, values)
    for item in values.get("set_", []):
        key, _, raw = item.partition("=")
        if _placeholder(key):
            continue
        known = key_exists(schema, key) if schema is not None else any(
            key_exists(s, key) for s in schemas().values())
        if not known:
            problems.append(f"{where}: --set {key}: no such config key")
        elif schema is not None:
            problem = _value_problem(schema, key, raw)
            if problem:
                problems.append(f"{where}: {problem}")
    return problems


def check_yaml(block_text: str, tmp: Path) -> list[str]:
    """A whole config is validated by ``koret config validate``; a ``# fragment: STAGE`` block by the stage's
    schema alone (its keys and values, not the chain's cross-section rules)."""
    first = (block_text.strip().splitlines() or [""])[0]
    fragment = re.match(r"^#\s*fragment\b:?\s*([\w-]*)", first)
    try:
        raw = load_yaml_text(block_text)
    except Exception as exc:  # noqa: BLE001 - any YAML error is the doc's problem
        return [f"invalid YAML: {str(exc).splitlines()[0]}"]
    if fragment:
        from koret.cli import _schema
        from koret.errors import KoretError

        stage = fragment.group(1)
        if not stage:
            return ["a fragment names its stage: # fragment: mine|filter|train|reranker|eval|push|run"]
        try:
            validate(_schema(stage), raw or {}, f"fragment of a {stage} config")
        except KoretError as exc:
            return [str(exc)]
        return []
    path = tmp / "block.yaml"
    path.write_text(block_text, encoding="utf-8")
    result = CliRunner().invoke(app, ["config", "validate", "-c", str(path)])
    if result.exit_code != 0:
        return [(result.stderr or result.output).strip().replace(str(path), "block")
                or f"exit {result.exit_code}: {result.exception!r}"]  # a crash in validate prints nothing
    return []


@functools.cache
def _module_names(module: str) -> frozenset[str] | None:
    """The names a koret module defines or imports at its top level (its source read with ``ast``, not imported),
    plus its submodules; None when there is no such module."""
    base = REPO / Path(*module.split("."))
    source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not source.is_file():
        return None
    names: set[str] = set()
    body = list(ast.parse(source.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            body += [s for h in getattr(node, "handlers", []) for s in h.body]
    if base.is_dir():
        names |= {p.stem for p in base.glob("*.py")} | {p.name for p in base.iterdir() if (p / "__init__.py").exists()}
    return frozenset(names)


def check_python(block_text: str) -> list[str]:
    """A python block parses, and its koret imports resolve: the modules exist and define what is imported."""
    try:
        tree = ast.parse(block_text)
    except SyntaxError as exc:
        return [f"python block: line {exc.lineno}: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "koret":
            names = _module_names(node.module)
            if names is None:
                problems.append(f"python block: from {node.module} import ...: no module {node.module}")
                continue
            problems += [f"python block: from {node.module} import {a.name}: cannot import {a.name!r}"
                         for a in node.names if a.name != "*" and a.name not in names]
        elif isinstance(node, ast.Import):
            problems += [f"python block: import {a.name}: no module {a.name}" for a in node.names
                         if a.name.split(".")[0] == "koret" and _module_names(a.name) is None]
    return problems


def _has_keys(annotation) -> bool:
    """A section, an optional section, a list of sections or a mapping (``args``): a field with dotted keys."""
    import typing

    from pydantic import BaseModel

    args = [annotation, *typing.get_args(annotation)]
    args += [b for a in args for b in typing.get_args(a)]
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in args) or typing.get_origin(annotation) is dict


def check_spans(text: str) -> list[str]:
    """Inline code naming a config key that no schema has, or a repository path that does not exist."""
    problems = []
    tops = {name for s in schemas().values() for name, f in s.model_fields.items() if _has_keys(f.annotation)}
    for n, span in inline_spans(text):
        m = re.match(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)\s*(?:[:=].*)?$", span)
        if m:
            key = m.group(1)
            parts = key.split(".")
            if parts[0] in tops and parts[-1] not in FILE_SUFFIXES and not any(
                    key_exists(s, key) for s in schemas().values()):
                problems.append(f"line {n}: `{span}`: no such config key")
        if span.startswith(REPO_DIRS) and re.match(r"^[\w./-]+$", span) and not (REPO / span).exists():
            problems.append(f"line {n}: `{span}`: no such file or folder")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(text):
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def check_links(doc: Path, text: str) -> list[str]:
    problems = []
    for n, line in prose(text):
        line = re.sub(r"(`+).+?\1", "", line)
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            if not file_part:
                if anchor not in anchors(text):
                    problems.append(f"line {n}: link {target}: no heading #{anchor} on this page")
                continue
            target_path = (doc.parent / file_part).resolve()
            if not target_path.exists():
                problems.append(f"line {n}: link {target}: no such file")
                continue
            if anchor and target_path.suffix == ".md":
                if anchor not in anchors(target_path.read_text(encoding="utf-8")):
                    problems.append(f"line {n}: link {target}: no heading #{anchor} in {target_path.name}")
    return problems


# "#12", "(#12)", "issue 12", ".../issues/12", ".../pull/12"; not a link's anchor "](#12-...)" or "&#12;"
ISSUE_REF = re.compile(r"(?i)\bissues?\s*[#/]?\d+|/pull/\d+|(?<![\w&/#\[])(?<!\]\()#\d+\b")


def check_issue_refs(text: str) -> list[str]:
    return [f"line {n}: {m.group(0)!r}: user docs cite no issue numbers"
            for n, line in enumerate(text.splitlines(), 1) for m in ISSUE_REF.finditer(line)]


def check_doc(doc: Path, text: str, tmp: Path) -> list[str]:
    problems = [f"line {n}: {p}" for n, line in command_lines(text) for p in check_command(line)]
    for block in code_blocks(text):
        if block.info.split(" ")[0].lower() in ("yaml", "yml"):
            problems += [f"line {block.line}: yaml block: {p}" for p in check_yaml(block.text, tmp)]
        if block.info.split(" ")[0].lower() in ("python", "py"):
            problems += [f"line {block.line}: {p}" for p in check_python(block.text)]
    return problems + check_spans(text) + check_links(doc, text) + check_issue_refs(text)


# --------------------------------------------------------------------------------------------- the tests


def test_docs_pages_exist():
    missing = [p for p in PAGES if not (DOCS / f"{p}.md").exists()]
    assert not missing, f"docs/ lacks {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_doc_matches_the_code(doc, tmp_path):
    problems = check_doc(doc, doc.read_text(encoding="utf-8"), tmp_path)
    assert not problems, f"{doc.relative_to(REPO)}:\n" + "\n".join(problems)


def test_docs_hold_commands_and_configs():
    """The checks above have something to check: command lines, whole configs and fragments."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in doc_files())
    commands = [line for _, line in command_lines(text) if koret_args(line) is not None]
    yaml_blocks = [b for b in code_blocks(text) if b.info.split(" ")[0] == "yaml"]
    assert len(commands) > 40 and len(yaml_blocks) >= 5, (len(commands), len(yaml_blocks))
    assert any(b.text.startswith("# fragment:") for b in yaml_blocks)
    assert any(not b.text.startswith("# fragment") for b in yaml_blocks)


def test_configuration_reference_is_generated_from_the_models():
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == reference(), "docs/configuration.md is stale: koret config reference > docs/configuration.md"


def test_config_reference_command_prints_the_reference():
    result = CliRunner().invoke(app, ["config", "reference"])
    assert result.exit_code == 0 and result.stdout == reference()


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    head = "\n".join(lines[:40])
    assert "make quickstart" in head and "make test" in head
    # every command's page is one link away
    for page in ("mining", "scale-out", "training", "reranker", "evaluation", "pipeline", "configuration",
                 "troubleshooting", "development", "benchmarks", "quality"):
        assert f"(docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


def test_readme_headline_numbers_are_the_results_files():
    """The "measured so far" box quotes bench/results/quality.json and mine.json as they are."""
    text = README.read_text(encoding="utf-8").replace("\u2212", "-")  # the README writes minus signs as U+2212
    quality = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    arms = {a["arm"]: a for a in quality["arms"]}

    def ci(s):
        return f"{s['delta'] * 100:+.2f} [{s['ci_low'] * 100:+.2f}, {s['ci_high'] * 100:+.2f}]"

    korquad = quality["meta"]["suite"][0]  # the held-out KorQuAD articles: the study's main set

    def gain(arm):
        return arm["sets"][korquad].get("vs_base", {}).get("ndcg@10")

    best = max((a for a in arms.values() if gain(a)), key=lambda a: gain(a)["delta"])
    # the best arm, the default, and the two it replaced that the README quotes (raw and calibrated perc_pos)
    for arm in {best["arm"], quality["meta"]["default_arm"], "perc_mnrl", "calib_mnrl"} & set(arms):
        assert ci(gain(arms[arm])) in text, arm
    mine = json.loads((REPO / "bench" / "results" / "mine.json").read_text())
    for size in mine["sizes"]:
        assert f"{size['time_ratio']:.2f}x" in text, size["size"]
    # the reranker-training row (time and peak RSS against the plain CrossEncoderTrainer script, what a step
    # costs) and the BM25 row (speed-up over the per-query loop on 1 and 2 threads), from the same make bench
    flat = re.sub(r"\s*\n>?\s*", " ", text)  # the box's lines joined
    rr = json.loads((REPO / "bench" / "results" / "reranker.json").read_text())
    assert rr["date"] in text
    assert (f"`koret train-reranker` {rr['koret_vs_plain_time']:.2f}x the time and {rr['koret_vs_plain_rss']:.2f}x "
            f"the peak RSS" in flat), "README: the reranker-training row"
    assert f"{rr['koret']['s_per_step']:.1f} s a step, {rr['koret']['peak_rss_mb'] / 1024:.1f} GB peak RSS" in flat
    lex = json.loads((REPO / "bench" / "results" / "lexical.json").read_text())
    assert lex["date"] in text
    speedups = [lex["reference_s"] / lex["bm25_top_k"][t]["seconds"] for t in ("1", "2")]
    assert (f"{lex['passages'] // 1000}k passages x {lex['queries'] // 1000}k queries: {speedups[0]:.2f}x / "
            f"{speedups[1]:.2f}x" in flat), "README: the BM25 row"


def test_scripts_write_their_tables_into_docs():
    """make bench, make quality and scripts/projection.py rewrite the text between their markers in docs/."""
    for page, section in (("benchmarks", "bench"), ("quality", "quality"), ("scale-out", "projection")):
        text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
        assert f"<!-- {section}:begin" in text and f"<!-- {section}:end -->" in text, (page, section)
    for script in ("bench.py", "quality.py", "projection.py"):
        assert "update_doc(" in (REPO / "scripts" / script).read_text(), script
    bench = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    results = (REPO / "bench" / "results" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in results.splitlines() if line.startswith("| ")]
    assert rows and all(line in bench for line in rows), "docs/benchmarks.md is not bench/results/README.md"


def test_development_page_names_every_module():
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "koret").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/development.md does not describe {missing}"


def test_help_lists_the_chain_in_order_and_ends_with_an_example():
    names = ROOT_COMMAND.list_commands(None)
    assert names == ["mine", "filter", "train", "train-reranker", "eval", "push", "run", "config", "synth",
                     "version"], names
    # one line each in `koret --help`: the list shows a command's first paragraph, line breaks included
    broken = [n for n in names if "\n" in (ROOT_COMMAND.commands[n].help or "").strip().split("\n\n")[0]]
    assert not broken, f"the first paragraph of these commands' help spans several lines: {broken}"
    runner = CliRunner()
    commands = [[n] for n in names if n != "config"] + [["config", n] for n in ROOT_COMMAND.commands["config"].commands]
    for argv in [*commands, ["config"]]:
        result = runner.invoke(app, [*argv, "--help"])
        assert result.exit_code == 0, argv
        after_box = result.stdout.rsplit("╰", 1)[-1].split("\n", 1)[-1]  # the epilog, below the last panel
        example = EXAMPLES[" ".join(argv)]
        assert " ".join(after_box.split()) == f"Example: {example}", (argv, after_box)
        assert koret_args(example) is not None and not check_command(example), (argv, check_command(example))


# --------------------------------------------------------------------------------------------- the checkers catch drift

BROKEN = {
    "renamed command": ("```bash\nkoret mien -c configs/mine.yaml\n```\n", "no such command"),
    "renamed option": ("```bash\nkoret mine -c configs/mine.yaml --num-procs 8\n```\n", "no option --num-procs"),
    "option of another command": ("`koret filter -c runs/mine/config.yaml --resume`", "no option --resume"),
    "renamed --set key": ("```bash\nkoret mine -c configs/mine.yaml --set filter.stratgy=abs\n```\n",
                          "--set filter.stratgy: no such config key"),
    "renamed args key": ("```bash\nkoret train -c configs/train.yaml --set args.learning_rat=1e-5\n```\n",
                         "--set args.learning_rat: no such config key"),
    "renamed config file": ("```bash\nkoret run -c configs/quickstart2.yaml\n```\n", "no such file"),
    "unknown stage": ("```bash\nkoret run -c configs/quickstart.yaml --only rerank\n```\n", "no such stage"),
    "renamed key in a whole config": ("```yaml\nteacher:\n  model: BAAI/bge-m3\nfilter:\n  percent: 0.9\n```\n",
                                      "unknown key 'filter.percent'"),
    "renamed key in a fragment": ("```yaml\n# fragment: train\nloss:\n  distil: {name: kl}\n```\n",
                                  "unknown key 'loss.distil'"),
    "fragment without a stage": ("```yaml\n# fragment\nloss: {name: mnrl}\n```\n", "names its stage"),
    "renamed key in prose": ("Set `filter.percent` to 0.9.", "`filter.percent`: no such config key"),
    "renamed key with a value in prose": ("`search.lexical.topk: 50`", "no such config key"),
    "renamed module in prose": ("See `koret/sharded.py`.", "no such file or folder"),
    "broken link": ("See [mining](missing-page.md).", "no such file"),
    "broken anchor": ("See [exact scores](mining.md#exact-score).", "no heading #exact-score"),
    "broken anchor on the same page": ("# Top\n\nSee [below](#nowhere) and [top](#top).", "no heading #nowhere"),
    "issue number": ("Fixed in issue #12.", "no issue numbers"),
    "bare issue reference": ("See #12 for why.", "no issue numbers"),
    "issue reference in parentheses": ("Fixed the cache key (#12).", "no issue numbers"),
    "issue link": ("See [the bug](https://github.com/o/koret/issues/12).", "no issue numbers"),
    "-c file outside configs/": ("```bash\nkoret train -c data/my-train.yaml\n```\n", "-c data/my-train.yaml: no such file"),
    "run file given to a stage command": ("```bash\nkoret train -c configs/arctic-ko.yaml\n```\n",
                                          "is a run config, which `koret run` reads, not `koret train`"),
    "stage file given to another stage": ("`koret train -c configs/reranker.yaml`",
                                          "is a reranker config, which `koret train-reranker` reads"),
    "command in a text block": ("```text\nkoret mien -c configs/mine.yaml\n```\n", "no such command"),
    "prompted command in an unlabelled block": ("```\n$ koret mine -c configs/mine.yaml --num-procs 2\n```\n",
                                                "no option --num-procs"),
    "python import of a renamed function": ("```python\nfrom koret.filter import refiltr\n```\n",
                                            "cannot import 'refiltr'"),
    "python import of a renamed module": ("```python\nfrom koret.refilter import refilter\n```\n",
                                          "no module koret.refilter"),
    "python block that does not parse": ("```python\nfrom koret.mine import (mine\n```\n", "python block: line"),
    "--set value outside a key's choices": ("```bash\nkoret mine -c configs/mine.yaml --set filter.strategy=perc\n```\n",
                                            "--set filter.strategy=perc: not a valid value"),
    "--set value outside a union's choices": (
        "`koret train-reranker -c configs/reranker.yaml --set model.attention_dropout=always`",
        "--set model.attention_dropout=always: not a valid value"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checkers_report_what_a_rename_breaks(case, tmp_path):
    snippet, expected = BROKEN[case]
    problems = check_doc(DOCS / "snippet.md", snippet, tmp_path)
    assert any(expected in p for p in problems), (case, problems)


def test_checkers_accept_what_is_right(tmp_path):
    snippet = ("```bash\nkoret mine -c configs/mine.yaml --set filter.perc=0.9 --num-processes 2 [--quiet]\n"
               "torchrun --nproc_per_node 8 -m koret train -c configs/train.yaml --set args.learning_rate=1e-5\n"
               "koret config reference > docs/configuration.md\n"
               "koret filter -c runs/mine/config.yaml --set filter.strategy=margin_pos\n"
               "koret filter -c configs/mine.yaml --set filter.sampling=random\n"
               "koret train-reranker -c configs/reranker.yaml --set model.attention_dropout=auto "
               "--set model.attention_dropout=0.1 --set loss.name=LOSS\n"
               "koret run -c $RUN_FILE\n"
               "koret config validate -c configs/quickstart.yaml\n```\n"
               "```text\n$ koret run -c configs/quickstart.yaml\nkoret run: runs/quickstart\n"
               " koret mine ─── teacher embeddings\nerror: ...\n```\n"
               "```python\nfrom koret.config import MineConfig, load_config\nfrom koret.pipeline import PipelineConfig\n"
               "from koret.training.distill import score_kind_of\nfrom koret import config\nimport koret.mine\n```\n"
               "A [heading](mining.md#exact-scores) (see mining); the mean (0.5) and the list of 12.\n"
               "```yaml\n# fragment: mine\nsearch:\n  lexical: {top_k: 50}\n```\n"
               "Keys: `filter.perc`, `search.lexical.top_k: 50`, `args.learning_rate`, `train.parquet`; "
               "[exact scores](mining.md#exact-scores); `koret eval --model A --reranker B --rerank-top-k 100`.\n")
    assert check_doc(DOCS / "snippet.md", snippet, tmp_path) == []
