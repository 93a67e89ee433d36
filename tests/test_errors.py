"""Every user error of koret mine / filter: one line, exit code 2, no traceback, no partial outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import mine_config, run_cli, run_subprocess, write_config


def _expect_user_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _no_outputs(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def _write_pairs(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD = '{"query": "한글은 누가 만들었나?", "positive": "한글은 세종이 창제하였다."}\n' \
       '{"query": "김치는 어떻게 보관하나?", "positive": "김치는 낮은 온도에서 보관한다."}\n' \
       '{"query": "장마는 언제?", "positive": "장마는 6월 하순에 시작한다."}\n'


@pytest.mark.parametrize("name,content,overrides,needles", [
    ("missing file", None, {}, ["data.train", "file not found"]),
    ("corrupt parquet", b"PAR1garbage", {"data__train": "{tmp}/bad.parquet"}, ["unreadable or corrupt parquet"]),
    ("corrupt json", "[{]", {"data__train": "{tmp}/bad.json"}, ["unreadable or corrupt json"]),
    ("empty dataset", "", {}, ["empty dataset"]),
    ("missing column", GOOD, {"data__query_column": "question"},
     ["column 'question' (data.query_column) not found", "available columns: query, positive"]),
    ("empty positive", '{"query": "a", "positive": " "}\n', {}, ["row 0 column 'positive': empty passage"]),
    ("wrong type", GOOD, {"search__top_k": "lots"}, ["search.top_k", "'lots'"]),
    ("unknown strategy", GOOD, {"filter__strategy": "clever"}, ["filter.strategy", "perc_pos"]),
    ("negatives > top_k", GOOD, {"filter__num_negatives": 50, "search__top_k": 10},
     ["num_negatives (50) is larger than search.top_k (10)"]),
    ("unknown key", GOOD, {"filter__percentage": 0.9}, ["unknown key 'filter.percentage'", "did you mean"]),
    ("model folder missing", GOOD, {"teacher__model": "{tmp}/models/none"},
     ["teacher.model: model folder not found"]),
    ("hub id not cached offline", GOOD, {"teacher__model": "nobody/no-such-model"},
     ["'nobody/no-such-model'", "HF_HUB_OFFLINE"]),
    ("rescore model missing", GOOD, {"rescore__model": "{tmp}/no-ce"}, ["rescore.model: model folder not found"]),
    ("abs without max_score", GOOD, {"filter__strategy": "abs"}, ["filter.max_score: required"]),
])
def test_mine_user_errors(tmp_path, tiny_model, monkeypatch, name, content, overrides, needles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = tmp_path / "pairs.jsonl"
    if content is not None:
        _write_pairs(train, "") if isinstance(content, bytes) else _write_pairs(train, content)
    for key, value in list(overrides.items()):
        if isinstance(value, str) and "{tmp}" in value:
            overrides[key] = value.format(tmp=tmp_path)
            if key == "data__train":
                target = Path(overrides[key])
                target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    cfg = mine_config(tmp_path, tiny_model, train, **{"search__top_k": 2, "filter__num_negatives": 1, **overrides})
    result = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--quiet")
    _expect_user_error(result, *needles)
    _no_outputs(tmp_path / "out")


def test_filter_without_candidates(tmp_path):
    cfg = {"output": {"dir": str(tmp_path / "nothing")}}
    result = run_cli("filter", "-c", str(write_config(tmp_path / "f.yaml", cfg)))
    _expect_user_error(result, "candidates.parquet not found", "run koret mine first")


def test_debug_shows_the_traceback(tmp_path):
    cfg = {"data": {"train": str(tmp_path / "missing.jsonl")}, "teacher": {"model": "x"}}
    result = run_subprocess("mine", "-c", str(write_config(tmp_path / "m.yaml", cfg)), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "KoretError" in result.stderr
