"""The package's shape: no import cycles among koret's modules, and the filter rules stay a pure leaf."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "koret"


def koret_imports() -> dict[str, set[str]]:
    """For every module of koret, the koret modules it imports anywhere in its body (lazy imports included)."""
    modules = {p.stem if p.parent == PACKAGE else f"{p.parent.name}.{p.stem}": p
               for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("koret"):
                base = node.module[len("koret."):] if node.module != "koret" else ""
                for alias in node.names:
                    target = f"{base}.{alias.name}" if base else alias.name
                    deps.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name[len("koret."):] for a in node.names if a.name.startswith("koret."))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = koret_imports()
    assert {"mine", "filter", "filter_rules", "candidates", "train", "evaluate", "search", "pipeline"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_filter_rules_are_a_pure_leaf():
    assert koret_imports()["filter_rules"] <= {"errors", "calibration"}
    assert koret_imports()["calibration"] <= {"errors"}
    assert koret_imports()["metrics"] == set() and koret_imports()["prompts"] <= {"errors"}


def test_every_stage_comes_from_the_registry():
    """koret run's sections, its chain, the CLI commands and config validate all read koret/stages.py."""
    from koret.cli import app
    from koret.pipeline import CHAIN, PipelineConfig
    from koret.stages import REGISTRY

    assert list(PipelineConfig.model_fields) == ["run", *REGISTRY] and CHAIN == tuple(REGISTRY)
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {s.command for s in REGISTRY.values()} <= commands
    assert all(s.chain is not None and s.run.count(":") == 1 for s in REGISTRY.values())


def test_each_stage_lives_in_the_module_named_after_its_command():
    """A reader finds a stage from its command: ``koret train-reranker`` is ``koret/train_reranker.py`` (eval is
    ``evaluate.py``: a module named eval would shadow the builtin in imports), and its config class is named after
    its koret run section (``reranker`` -> RerankerConfig, ``filter`` reads a mine config)."""
    from koret.stages import REGISTRY

    for stage in REGISTRY.values():
        module = stage.run.partition(":")[0]
        want = "koret.evaluate" if stage.command == "eval" else f"koret.{stage.command.replace('-', '_')}"
        assert module == want, (stage.name, module)
        section = stage.section or stage.schema
        assert section.__name__.lower().startswith(stage.name), (stage.name, section.__name__)
