"""Config loading, overrides and one-line validation errors."""

from __future__ import annotations

import pytest
import yaml
from helpers import run_cli

from koret.config import MineConfig, apply_overrides, load_config, parse_override
from koret.errors import KoretError


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_overrides_parse_yaml_scalars_and_lists():
    assert parse_override("filter.perc=0.9") == (["filter", "perc"], 0.9)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e=2"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": 2}}
    with pytest.raises(KoretError, match="dotted.key=value"):
        parse_override("nokey")


def test_defaults_and_override(tmp_path):
    cfg = load_config(MineConfig, _write(tmp_path, "data: {train: x.jsonl}\n"), ["search.top_k=200"])
    assert cfg.search.top_k == 200 and cfg.filter.strategy == "naive" and cfg.filter.max_overlap == 0.9
    assert cfg.filter.num_negatives == 7 and cfg.search.index == "Flat" and cfg.data.normalize == "nfc"


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(KoretError) as err:
        load_config(MineConfig, _write(tmp_path, "filter:\n  stratgy: naive\n"))
    msg = str(err.value)
    assert "c.yaml" in msg and "filter.stratgy" in msg and "did you mean 'filter.strategy'" in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(KoretError, match=r"unknown key 'serch'.*did you mean 'search'"):
        load_config(MineConfig, _write(tmp_path, "serch: {top_k: 3}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(KoretError, match=r"c.yaml: search.top_k: .*integer.*'many'"):
        load_config(MineConfig, _write(tmp_path, "search: {top_k: many}\n"))


def test_unknown_strategy_lists_choices(tmp_path):
    with pytest.raises(KoretError, match=r"filter.strategy: .*perc_pos"):
        load_config(MineConfig, _write(tmp_path, "filter: {strategy: best}\n"))


def test_negatives_must_fit_top_k(tmp_path):
    with pytest.raises(KoretError, match=r"num_negatives \(20\) is larger than search.top_k \(10\)"):
        load_config(MineConfig, _write(tmp_path, "search: {top_k: 10}\nfilter: {num_negatives: 20}\n"))


def test_negative_margin_rejected(tmp_path):
    with pytest.raises(KoretError, match="filter.margin: must be >= 0"):
        load_config(MineConfig, _write(tmp_path, "filter: {margin: -0.1}\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(KoretError, match=r"line \d+: invalid YAML"):
        load_config(MineConfig, _write(tmp_path, "data:\n  train: [unclosed\n"))
    with pytest.raises(KoretError, match="config file not found"):
        load_config(MineConfig, tmp_path / "nope.yaml")
    with pytest.raises(KoretError, match="expected a mapping"):
        load_config(MineConfig, _write(tmp_path, "- 1\n- 2\n"))


def test_config_show_and_validate_cli(tmp_path):
    path = _write(tmp_path, "data: {train: x.jsonl}\n")
    shown = run_cli("config", "show", "-c", str(path), "--set", "filter.perc=0.9", "--stage", "mine")
    assert shown.exit_code == 0
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["filter"]["perc"] == 0.9 and resolved["search"]["top_k"] == 100
    assert run_cli("config", "validate", "-c", str(path), "--stage", "mine").exit_code == 0
    bad = run_cli("config", "validate", "-c", str(path), "--set", "filter.num_negatives=0", "--stage", "mine")
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and "filter.num_negatives" in bad.stderr


@pytest.mark.parametrize("name,stage", [("mine.yaml", "mine"), ("train.yaml", "train"), ("eval.yaml", "eval"),
                                        ("push.yaml", "push"), ("quickstart.yaml", "run"),
                                        ("arctic-ko.yaml", "run"), ("e5-ko.yaml", "run"),
                                        ("reranker.yaml", "reranker"),
                                        ("reranker-ko.yaml", "reranker")])
def test_shipped_configs_validate(name, stage):
    from helpers import REPO

    result = run_cli("config", "validate", "-c", str(REPO / "configs" / name), "--stage", stage)
    assert result.exit_code == 0, result.stderr
    told = run_cli("config", "validate", "-c", str(REPO / "configs" / name))  # the stage told by the keys
    assert told.exit_code == 0 and f"valid {stage} config" in told.stdout, told.stderr


def test_validate_catches_what_a_run_would_reject_before_any_model_loads(tmp_path):
    def check(cfg: dict, *needles: str, stage: str | None = None) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = run_cli("config", "validate", "-c", str(path), *(["--stage", stage] if stage else []))
        assert r.exit_code == 2, r.stdout
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        for n in needles:
            assert n in line, (n, line)

    check({"model": {"name": "x"}, "args": {"learnin_rate": 1e-5}}, "unknown key 'args.learnin_rate'",
          "did you mean 'args.learning_rate'?")
    check({"teacher": {"model": "x"}, "filter": {"strategy": "abs"}}, "filter.max_score: required by filter.strategy")
    check({"model": {"name": "x"}, "loss": {"mini_batch_size": 64}, "args": {"per_device_train_batch_size": 16}},
          "loss.mini_batch_size (64) is larger than the batch")
    check({"run": {"dir": "r"}, "filter": {"perc": 0.9}}, "the filter stage needs a mine section")
    check({"nothing": 1}, "cannot tell which stage", "--stage")


@pytest.mark.parametrize("keys,stage", [({"teacher", "data", "filter"}, "mine"), ({"filter", "output"}, "filter"),
                                        ({"model", "loss", "args"}, "train"), ({"models", "data"}, "eval"),
                                        ({"repo_id", "model"}, "push"), ({"run", "mine", "train"}, "run"),
                                        ({"mine"}, "run")])
def test_stage_is_told_by_top_level_keys(keys, stage):
    from koret.config import stage_of_keys

    assert stage_of_keys(keys, "f.yaml") == stage


def test_yaml_floats_and_no_read_as_meant(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string and a bare no as false: learning_rate: 1e-4 crashed deep in the
    optimizer, save_strategy: no was rejected."""
    from koret.config import TrainConfig

    path = tmp_path / "t.yaml"
    path.write_text("model: {name: x}\nargs: {learning_rate: 1e-4, weight_decay: 2E-2, save_strategy: no}\n")
    cfg = load_config(TrainConfig, path, ["args.warmup_steps=5e-2"])
    assert cfg.args["learning_rate"] == 1e-4 and cfg.args["weight_decay"] == 0.02 and cfg.args["warmup_steps"] == 0.05
    from sentence_transformers import SentenceTransformerTrainingArguments

    from koret.training.common import training_arguments

    args = training_arguments(SentenceTransformerTrainingArguments, {**cfg.args, "output_dir": str(tmp_path)}, False)
    assert args.learning_rate == 1e-4 and str(args.save_strategy.value) == "no"
