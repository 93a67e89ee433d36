"""Helpers shared by the tests: run the CLI in-process or as a subprocess, build configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from koret.cli import app

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> Any:
    """Invoke ``koret ARGS`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def run_subprocess(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "koret", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


def mine_config(tmp: Path, model: Path, train: Path | str, *, out: str = "out", cache: str = "cache",
                **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data": {"train": str(train)},
        "teacher": {"model": str(model), "query_prompt_name": "query", "passage_prompt_name": "passage", "batch_size": 16},
        "encode": {"shard_size": 64},
        "search": {"top_k": 30},
        # the tests were written on perc_pos 0.95 without the near-duplicate guard (koret's defaults before
        # 2026-12-02); tests/test_config.py and tests/test_overlap.py test the defaults themselves
        "filter": {"num_negatives": 3, "strategy": "perc_pos", "max_overlap": None},
        "output": {"dir": str(tmp / out)},
        "cache_dir": str(tmp / cache),
    }
    for dotted, value in overrides.items():
        node = cfg
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def attention_dropouts(body: Any) -> set[float]:
    """The attention-probability dropout each attention layer of a transformers model applies in training (BERT's
    self-attention dropout module; a Qwen3-style decoder's attention_dropout)."""
    found = set()
    for name, module in body.named_modules():
        if name.endswith("attention.self"):
            found.add(module.dropout.p)
        elif name.endswith("self_attn"):
            found.add(float(module.attention_dropout))
    assert found, "no attention layers found"
    return found


def record_training_dropout(monkeypatch: Any, recipe: Any) -> list[tuple[float, set[float]]]:
    """Patch ``recipe.load_student`` to record, at each training forward of the student, its transformers
    config's attention dropout and what its attention layers apply."""
    seen: list[tuple[float, set[float]]] = []
    load = recipe.load_student

    def recording_load(cfg, *args, **kwargs):
        student = load(cfg, *args, **kwargs)
        body = student[0].model  # called through .forward by sentence-transformers: hook an attention layer
        config = body.config
        key = "attention_probs_dropout_prob" if hasattr(config, "attention_probs_dropout_prob") else "attention_dropout"
        first = next(m for n, m in body.named_modules() if n.endswith(("attention.self", "self_attn")))

        def hook(module, inputs):
            if module.training:
                seen.append((getattr(config, key), attention_dropouts(body)))

        first.register_forward_pre_hook(hook)
        return student

    monkeypatch.setattr(recipe, "load_student", recording_load)
    return seen
