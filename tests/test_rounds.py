"""koret run with run.rounds: 2: round 2 mines with round 1's trained model, trains again, and everything after
(eval, push, the summary) knows there were two rounds; reruns, --force and the steps' names work per round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, write_config


def _config(root: Path, tiny_model: Path, data_dir: Path, **run) -> dict:
    return {
        "run": {"dir": str(root / "run"), "rounds": 2, **run},
        "mine": {"data": {"train": str(data_dir / "pairs.jsonl"), "corpus": str(data_dir / "corpus.txt")},
                 "teacher": {"model": str(tiny_model), "query_prompt_name": "query",
                             "passage_prompt_name": "passage"},
                 "search": {"top_k": 10}, "filter": {"num_negatives": 2}, "cache_dir": str(root / "cache")},
        "filter": {"num_negatives": 2, "perc": 0.97},
        "train": {"model": {"name": str(tiny_model), "query_prompt_name": "query", "passage_prompt_name": "passage"},
                  "loss": {"name": "mnrl"},
                  "args": {"per_device_train_batch_size": 32, "num_train_epochs": 1, "learning_rate": 1e-3,
                           "save_steps": 1000}},
        "eval": {"data": {"path": str(data_dir / "pairs.jsonl")}, "k": [10], "cache_dir": str(root / "cache"),
                 "significance": {"resamples": 200}},
        "push": {"repo_id": "someone/koret-rounds", "license": "apache-2.0", "dry_run": True},
    }


STEPS = ["mine", "filter", "train", "round-2/mine", "round-2/filter", "round-2/train", "eval", "push"]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model, data_dir):
    """The 2-round chain on two processes (torchrun, gloo: mine and train use both, the rest the main one); the
    tests rerun it on one (the keys hold no process count, so every step is current)."""
    from helpers import run_subprocess

    root = tmp_path_factory.mktemp("rounds")
    cfg = _config(root, tiny_model, data_dir)
    cfg["train"]["args"]["per_device_train_batch_size"] = 16  # the global batch of one process's 32
    path = write_config(root / "rounds.yaml", cfg)
    first = run_subprocess("run", "-c", str(path), "--num-processes", "2")
    return root, path, first


def _summary(root: Path) -> dict:
    return json.loads((root / "run" / "summary.json").read_text())


def test_round_two_mines_with_round_one_model_and_trains_on_from_it(two_rounds, tiny_model):
    root, _, first = two_rounds
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stderr.count("koret run: ") == 1, "one summary table, from the main process"
    run = root / "run"
    summary = _summary(root)
    assert summary["rounds"] == 2 and summary["ok"] is True and summary["processes"] == 2
    assert [s["stage"] for s in summary["stages"]] == STEPS and {s["status"] for s in summary["stages"]} == {"ran"}
    round1 = str(run / "train" / "final")
    # round 1 keeps a one-round run's layout and mined with the configured teacher
    assert json.loads((run / "mine" / "stats.json").read_text())["teacher"]["model"] == str(tiny_model)
    # round 2: mined and (re)filtered with round 1's model, read with the prompts it was saved with
    for stage in ("mine", "filter"):
        stats = json.loads((run / "round-2" / stage / "stats.json").read_text())
        assert stats["teacher"] == {**stats["teacher"], "model": round1, "query_prompt": "query: ",
                                    "passage_prompt": "passage: "}, stats["teacher"]
    assert (run / "round-2" / "filter" / "train.parquet").exists()
    # round 2 trained from round 1's model on round 2's negatives
    tm = json.loads((run / "round-2" / "train" / "metrics.json").read_text())
    assert tm["world_size"] == 2 and tm["base_model"] == round1 and tm["data"].endswith(str(run / "round-2" / "filter" / "train.parquet"))
    train_cfg = yaml.safe_load((run / "round-2" / "train" / "config.yaml").read_text())
    assert train_cfg["data"]["train"] == str(run / "round-2" / "filter" / "train.parquet")
    assert (run / "round-2" / "train" / "final" / "modules.json").exists()
    # eval: base, then each round's model, each compared with base; the figure names them
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert [(m["name"], m["model"]) for m in ev["models"]] == [
        ("base", str(tiny_model)), ("round 1", round1), ("round 2", str(run / "round-2" / "train" / "final"))]
    ndcg = [m["metrics"]["ndcg@10"] for m in ev["models"]]
    figure = next(s["figure"] for s in summary["stages"] if s["stage"] == "eval")
    assert figure == (f"NDCG@10 base {ndcg[0]:.4f} -> round 1 {ndcg[1]:.4f} -> round 2 {ndcg[2]:.4f} "
                      f"({ndcg[2] - ndcg[0]:+.4f} over base)")


def test_card_says_two_rounds_and_what_each_used(two_rounds, tiny_model):
    root, _, _ = two_rounds
    run = root / "run"
    card = (run / "push" / "README.md").read_text()
    round1 = run / "train" / "final"
    assert "2 rounds of mining and training (koret run, `run.rounds: 2`)" in card
    assert f"| 1 | `{tiny_model}` | `{tiny_model}` |" in card
    assert f"| 2 | round 1's model (`{round1}`) | round 1's model (`{round1}`) |" in card
    # the pushed model is round 2's, with round 2's eval row and mining facts
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    front = yaml.safe_load(card.split("---\n")[1])
    ndcg = next(m for m in front["model-index"][0]["results"][0]["metrics"] if m["type"] == "ndcg_at_10")
    assert ndcg["value"] == pytest.approx(ev["models"][2]["metrics"]["ndcg@10"], abs=1e-6)
    stats = json.loads((run / "round-2" / "filter" / "stats.json").read_text())
    assert f"| teacher | {round1} |" in card
    assert f"| (query, positive) rows in / written | {stats['rows_in']:,} / {stats['rows_out']:,} |" in card


def test_rerun_skips_every_round_and_force_redoes_one(two_rounds):
    root, path, _ = two_rounds

    def statuses(*flags):
        r = run_cli("run", "-c", str(path), "--quiet", *flags)
        assert r.exit_code == 0, r.stderr
        return {s["stage"]: s["status"] for s in _summary(root)["stages"]}

    assert set(statuses().values()) == {"skipped"}
    forced = statuses("--force", "--only", "round-2/filter")
    assert forced["round-2/filter"] == "ran" and forced["filter"] == forced["round-2/mine"] == "not selected"
    # what the refiltered round 2 invalidates reruns; round 1 and round 2's mine stay
    assert statuses() == {**dict.fromkeys(STEPS[:5], "skipped"), **dict.fromkeys(STEPS[5:], "ran")}
    assert set(statuses().values()) == {"skipped"}


def test_round_start_base_trains_round_two_from_the_base_model(tmp_path, tiny_model, data_dir):
    """Resolved only (no model loads): round 2's teacher is round 1's model either way; its student is the base
    model again, with the prompts the section gives it."""
    from koret.config import validate
    from koret.pipeline import PipelineConfig, resolve

    cfg = validate(PipelineConfig, _config(tmp_path, tiny_model, data_dir, round_start="base", rounds=3))
    steps = resolve(cfg, "p.yaml")
    run = tmp_path / "run"
    assert list(steps) == [*STEPS[:6], "round-3/mine", "round-3/filter", "round-3/train", "eval", "push"]
    assert steps["round-2/mine"].teacher.model == str(run / "train" / "final")
    assert steps["round-3/mine"].teacher.model == str(run / "round-2" / "train" / "final")
    for r in ("round-2", "round-3"):
        model = steps[f"{r}/train"].model
        assert (model.name, model.query_prompt_name) == (str(tiny_model), "query")
        assert steps[f"{r}/train"].args["output_dir"] == str(run / r / "train")
    assert [m.label for m in steps["eval"].models] == ["base", "round 1", "round 2", "round 3"]
    # a one-round run resolves as before rounds existed: same steps, same eval labels, a plain push config
    one = resolve(validate(PipelineConfig, _config(tmp_path, tiny_model, data_dir, rounds=1)), "p.yaml")
    assert list(one) == ["mine", "filter", "train", "eval", "push"]
    assert [m.label for m in one["eval"].models] == ["base", "trained"] and not hasattr(one["push"], "rounds")


def test_adding_a_round_keeps_round_one_current_and_the_card_names_a_base_start(tmp_path, tiny_model, data_dir):
    """Resolved only: a run file that gains run.rounds: 2 keeps round 1's step keys (its outputs stay current), and
    with round_start: base the card's Rounds table says round 2 trained from the base model again."""
    from koret.config import validate
    from koret.pipeline import PipelineConfig, _stage_hashes, resolve
    from koret.push import _rounds_section

    def hashes(**run):
        return _stage_hashes(resolve(validate(PipelineConfig, _config(tmp_path, tiny_model, data_dir, **run)), "p"))

    one, two = hashes(rounds=1), hashes(rounds=2, round_start="base")
    assert {s: two[s] for s in ("mine", "filter", "train")} == {s: one[s] for s in ("mine", "filter", "train")}
    assert two["eval"] != one["eval"] and two["push"] != one["push"]  # a new row, a new card
    push = resolve(validate(PipelineConfig, _config(tmp_path, tiny_model, data_dir, round_start="base")), "p")["push"]
    round1 = tmp_path / "run" / "train" / "final"
    assert push.rounds == [{"teacher": str(tiny_model), "start": str(tiny_model), "model": str(round1)},
                           {"teacher": str(round1), "start": str(tiny_model),
                            "model": str(tmp_path / "run" / "round-2" / "train" / "final")}]
    table = _rounds_section(push.rounds)
    assert f"| 2 | round 1's model (`{round1}`) | `{tiny_model}` |" in table
    assert _rounds_section(push.rounds[:1]) == []


@pytest.mark.parametrize(("change", "needle"), [
    ({"run": {"rounds": 0}}, "run.rounds: Input should be greater than or equal to 1"),
    ({"train": None}, "run.rounds: 2 rounds need a mine and a train section"),
    ({"mine": None, "filter": None}, "run.rounds: 2 rounds need a mine and a train section"),
    ({"train": {"data": {"train": "pairs.jsonl"}}}, "run.rounds: 2 rounds, but train.data.train is set"),
    ({"train": {"model": {"name": "m", "lora": {"merge": False}}}}, "which train.model.lora.merge: false leaves a LoRA "
     "adapter"),
])
def test_bad_rounds_are_one_line_errors_before_any_model_loads(tmp_path, data_dir, change, needle):
    missing = tmp_path / "no-such-model"  # loading it would fail with another error
    cfg = _config(tmp_path, missing, data_dir)
    for section, value in change.items():
        cfg[section] = None if value is None else {**cfg[section], **value}
    path = write_config(tmp_path / "bad.yaml", {k: v for k, v in cfg.items() if v is not None})
    for args in (("config", "validate", "-c", str(path)), ("run", "-c", str(path))):
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "run").exists(), "nothing ran"


def test_unknown_round_steps_are_refused(tmp_path, tiny_model, data_dir):
    path = write_config(tmp_path / "p.yaml", _config(tmp_path, tiny_model, data_dir))
    for step, needle in (("round-3/train", "the config has no 'round-3/train' step"),
                         ("round-1/train", "unknown stage 'round-1/train'"),
                         ("round-2/eval", "unknown stage 'round-2/eval'")):
        r = run_cli("run", "-c", str(path), "--only", step, "--quiet")
        assert r.exit_code == 2 and needle in r.stderr.strip().splitlines()[-1], (step, r.stderr)

