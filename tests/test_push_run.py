"""koret push (network boundary patched) and koret run (the whole chain, skipping, failure and resume)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import run_cli, write_config

TOKEN = "hf_koretTestTokenDoNotLeak0123456789"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model, data_dir):
    """The whole chain on the fixture data with the tiny model; push in dry-run."""
    root = tmp_path_factory.mktemp("run")
    cfg = {
        "run": {"dir": str(root / "run")},
        "mine": {"data": {"train": str(data_dir / "pairs.jsonl"), "corpus": str(data_dir / "corpus.txt")},
                 "teacher": {"model": str(tiny_model), "query_prompt_name": "query", "passage_prompt_name": "passage"},
                 "search": {"top_k": 30}, "filter": {"num_negatives": 3, "perc": 0.98},
                 "cache_dir": str(root / "cache")},
        "filter": {"num_negatives": 2, "perc": 0.97},
        "train": {"model": {"name": str(tiny_model), "query_prompt_name": "query", "passage_prompt_name": "passage"},
                  "loss": {"name": "cached_gist", "mini_batch_size": 8},
                  "args": {"per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 1,
                           "num_train_epochs": 2, "save_steps": 1000}},
        "eval": {"data": {"path": str(data_dir / "pairs.jsonl")}, "k": [1, 10], "cache_dir": str(root / "cache")},
        "push": {"repo_id": "someone/koret-tiny", "license": "apache-2.0", "dry_run": True},
    }
    path = write_config(root / "pipeline.yaml", cfg)
    first = run_cli("run", "-c", str(path))
    return root, path, first


def test_run_chains_every_stage(pipeline_run):
    root, _, first = pipeline_run
    assert first.exit_code == 0, first.stderr
    run = root / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["mine", "filter", "train", "eval", "push"]
    assert all(s["status"] == "ran" for s in summary["stages"]), summary
    figures = {s["stage"]: s["figure"] for s in summary["stages"]}
    assert "x 2 negatives" in figures["filter"] and figures["eval"].startswith("NDCG@10 ")
    assert figures["push"] == f"dry run: {run / 'push'}"
    # train read the filter's output and took mine's teacher as its guide
    train_cfg = yaml.safe_load((run / "train" / "config.yaml").read_text())
    assert train_cfg["data"]["train"] == str(run / "filter" / "train.parquet")
    assert json.loads((run / "train" / "metrics.json").read_text())["num_negatives"] == 2
    assert json.loads((run / "train" / "metrics.json").read_text())["guide"].startswith("teacher: ")
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert [m["name"] for m in ev["models"]] == ["base", "trained"]
    assert (run / "push" / "README.md").exists() and (run / "push" / "model.safetensors").exists()


def test_dry_run_card_states_the_real_numbers(pipeline_run):
    root, _, _ = pipeline_run
    run = root / "run"
    card = (run / "push" / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["language"] == ["ko"] and front["library_name"] == "sentence-transformers"
    assert front["license"] == "apache-2.0" and "koret" in front["tags"]
    results = front["model-index"][0]["results"][0]
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    trained = ev["models"][1]["metrics"]
    ndcg = next(m for m in results["metrics"] if m["type"] == "ndcg_at_10")
    assert ndcg["value"] == pytest.approx(trained["ndcg@10"], abs=1e-6)
    stats = json.loads((run / "filter" / "stats.json").read_text())
    tm = json.loads((run / "train" / "metrics.json").read_text())
    assert f"| (query, positive) rows in / written | {stats['rows_in']:,} / {stats['rows_out']:,} |" in card
    assert f"| candidates per query (top_k) | {stats['search']['top_k']} |" in card
    assert f"| final loss | {tm['final_loss']:.4f} |" in card
    assert f"{trained['ndcg@10']:.4f} ({trained['ndcg@10'] - ev['models'][0]['metrics']['ndcg@10']:+.4f} [" in card
    assert "paired bootstrap" in card, "the card says how the interval was computed"
    assert 'prompt_name="query"' in card and "arXiv:2407.15831" in card and "arXiv:2402.16829" in card


def test_run_skips_current_stages_and_force_redoes(pipeline_run):
    root, path, _ = pipeline_run
    second = run_cli("run", "-c", str(path))
    assert second.exit_code == 0, second.stderr
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["skipped"] * 5
    assert "skipped (outputs exist with the same config" in second.stderr

    # a changed filter setting reruns filter and everything downstream, not mine
    third = run_cli("run", "-c", str(path), "--set", "filter.perc=0.96", "--until", "filter")
    assert third.exit_code == 0, third.stderr
    statuses = {s["stage"]: s["status"] for s in json.loads((root / "run" / "summary.json").read_text())["stages"]}
    assert statuses == {"mine": "skipped", "filter": "ran", "train": "not selected", "eval": "not selected",
                        "push": "not selected"}
    forced = run_cli("run", "-c", str(path), "--set", "filter.perc=0.96", "--only", "filter", "--force")
    assert forced.exit_code == 0
    statuses = {s["stage"]: s["status"] for s in json.loads((root / "run" / "summary.json").read_text())["stages"]}
    assert statuses["filter"] == "ran" and statuses["mine"] == "not selected"


def test_failed_stage_stops_the_chain_and_rerun_resumes(tmp_path, tiny_model, data_dir):
    cfg = {
        "run": {"dir": str(tmp_path / "run")},
        "mine": {"data": {"train": str(data_dir / "pairs.jsonl")},
                 "teacher": {"model": str(tiny_model)}, "search": {"top_k": 20}, "filter": {"num_negatives": 2},
                 "cache_dir": str(tmp_path / "cache")},
        "eval": {"data": {"path": str(tmp_path / "missing.jsonl")}, "models": [{"name": str(tiny_model)}],
                 "k": [10], "cache_dir": str(tmp_path / "cache")},
        "push": {"repo_id": "x/y", "model": str(tiny_model), "dry_run": True},
    }
    path = write_config(tmp_path / "p.yaml", cfg)
    failed = run_cli("run", "-c", str(path), "--quiet")
    assert failed.exit_code == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("error: data.path: file not found")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ran", "failed", "not run"] and not summary["ok"]

    (tmp_path / "missing.jsonl").write_text((data_dir / "pairs.jsonl").read_text())
    again = run_cli("run", "-c", str(path), "--quiet")
    assert again.exit_code == 0, again.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["skipped", "ran", "ran"]


def test_card_says_when_a_source_is_missing(tmp_path, tiny_model):
    result = run_cli("push", "--set", f"model={tiny_model}", "--set", "repo_id=a/b", "--dry-run",
                     str(tmp_path / "staged"), "--quiet")
    assert result.exit_code == 0, result.stderr
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "No mining record was found" in card and "No training record was found" in card
    assert "No evaluation record was found" in card and "model-index" not in card


class FakeApi:
    """Stands in for huggingface_hub.HfApi at the network boundary; records calls and the uploaded files."""

    calls: list[tuple[str, dict]] = []
    fail: dict[str, list[int]] = {}

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token_given": token is not None}))

    def _maybe_fail(self, name):
        codes = FakeApi.fail.get(name) or []
        if codes:
            from huggingface_hub.errors import HfHubHTTPError

            code = codes.pop(0)
            raise HfHubHTTPError(f"HTTP {code}", response=SimpleNamespace(status_code=code, headers={}, request=None))

    def create_repo(self, repo_id, **kw):
        self._maybe_fail("create_repo")
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        self._maybe_fail("upload_folder")
        folder = Path(kw["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        FakeApi.calls.append(("upload_folder", {**kw, "files": files,
                                                "card": (folder / "README.md").read_text()}))
        return SimpleNamespace(oid="abc123")


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    FakeApi.fail = {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeApi


def test_push_uploads_the_staged_folder_with_arguments(pipeline_run, fake_hub, tmp_path):
    root, _, _ = pipeline_run
    run = root / "run"
    result = run_cli("push", "--set", f"model={run / 'train' / 'final'}", "--set", "repo_id=someone/koret-tiny",
                     "--set", "private=true", "--set", "revision=v1", "--set", "commit_message=first koret",
                     "--set", f"eval_dir={run / 'eval'}")
    assert result.exit_code == 0, result.stderr
    names = [c[0] for c in fake_hub.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    create = fake_hub.calls[1][1]
    assert create["repo_id"] == "someone/koret-tiny" and create["private"] is True and create["exist_ok"] is True
    assert fake_hub.calls[2][1]["branch"] == "v1"
    upload = fake_hub.calls[3][1]
    assert upload["repo_id"] == "someone/koret-tiny" and upload["revision"] == "v1"
    assert upload["commit_message"] == "first koret" and upload["repo_type"] == "model"
    assert {"README.md", "model.safetensors", "modules.json", "config_sentence_transformers.json"} <= set(
        upload["files"])
    assert "training_args.bin" not in upload["files"] and "model-index" in upload["card"]
    assert "https://huggingface.co/someone/koret-tiny/tree/v1" in result.stderr + result.stdout

    # the token appears in no output, file or card
    assert TOKEN not in result.stdout + result.stderr + upload["card"]
    for f in list(run.rglob("*")) + list(tmp_path.rglob("*")):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert TOKEN.encode() not in f.read_bytes(), f


def _expect(result, *needles):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr and TOKEN not in result.stderr
    for n in needles:
        assert n in last, (n, last)


def test_push_errors(tiny_model, fake_hub, monkeypatch, tmp_path):
    base = ["push", "--set", f"model={tiny_model}", "--set", "repo_id=someone/koret-tiny", "--quiet"]
    fake_hub.fail = {"create_repo": [401]}
    _expect(run_cli(*base), "token was rejected (401")
    fake_hub.fail = {"create_repo": [403]}
    _expect(run_cli(*base), "no write access (403)")
    fake_hub.fail = {"upload_folder": [503, 502]}
    fake_hub.calls = []
    ok = run_cli(*base)
    assert ok.exit_code == 0, ok.stderr
    assert [c[0] for c in fake_hub.calls].count("upload_folder") == 1, "retried after two transient errors"
    fake_hub.fail = {"upload_folder": [503] * 10}
    _expect(run_cli(*base), "could not upload after 4 attempt(s) (HTTP 503)")

    _expect(run_cli("push", "--set", f"model={tiny_model}", "--set", "repo_id=not a/valid//id"),
            "is not a valid repo id")
    (tmp_path / "plain").mkdir()
    _expect(run_cli("push", "--set", f"model={tmp_path / 'plain'}", "--set", "repo_id=a/b"),
            "is neither a SentenceTransformer folder")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    _expect(run_cli(*base), "no Hugging Face token", "HF_TOKEN")


@pytest.mark.slow
def test_run_on_two_processes_matches_one(pipeline_run, tmp_path):
    """koret run --num-processes 2 (torchrun, gloo): exit 0, one summary.json, a loadable final/, and the same
    mined and filtered train.parquet as the 1-process run."""
    import pandas as pd
    from helpers import run_subprocess
    from sentence_transformers import SentenceTransformer

    _, path, _ = pipeline_run
    cfg = yaml.safe_load(path.read_text())
    cfg["run"]["dir"] = str(tmp_path / "run2")
    cfg["mine"]["cache_dir"] = cfg["eval"]["cache_dir"] = str(tmp_path / "cache2")
    cfg["train"]["args"]["per_device_train_batch_size"] = 8
    two = write_config(tmp_path / "two.yaml", cfg)
    r = run_subprocess("run", "-c", str(two), "--num-processes", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    run2 = tmp_path / "run2"
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["processes"] == 2 and all(s["status"] == "ran" for s in summary["stages"]), summary
    assert r.stderr.count("koret run: ") == 1, "one summary table, from the main process"
    assert not (run2 / ".koret-sync").exists()
    cfg["run"]["dir"] = str(tmp_path / "run1")
    one = run_cli("run", "-c", str(write_config(tmp_path / "one.yaml", cfg)), "--until", "filter", "--quiet")
    assert one.exit_code == 0, one.stderr
    for stage in ("mine", "filter"):
        pd.testing.assert_frame_equal(pd.read_parquet(run2 / stage / "train.parquet"),
                                      pd.read_parquet(tmp_path / "run1" / stage / "train.parquet"))
    tm = json.loads((run2 / "train" / "metrics.json").read_text())
    rows = len(pd.read_parquet(run2 / "filter" / "train.parquet"))
    assert tm["world_size"] == 2 and tm["steps"] >= 2 * (rows // 16) - 2, (tm["steps"], rows)  # 2 epochs
    assert len(tm["loss_curve"]) == tm["steps"]
    assert SentenceTransformer(str(run2 / "train" / "final"), device="cpu").encode(["한글"]).shape == (1, 64)
    # a second run skips every stage on both processes
    again = run_subprocess("run", "-c", str(two), "--num-processes", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(s["status"] == "skipped" for s in json.loads((run2 / "summary.json").read_text())["stages"])


@pytest.mark.slow
def test_run_failure_on_two_processes_is_one_line_naming_a_process(tmp_path, tiny_model, data_dir):
    from helpers import run_subprocess

    cfg = {"run": {"dir": str(tmp_path / "run")},
           "mine": {"data": {"train": str(data_dir / "pairs.jsonl")},
                    "teacher": {"model": str(tiny_model), "query_prompt_name": "nope"},
                    "search": {"top_k": 10}, "filter": {"num_negatives": 2}, "cache_dir": str(tmp_path / "c")}}
    r = run_subprocess("run", "-c", str(write_config(tmp_path / "bad.yaml", cfg)), "--num-processes", "2",
                       timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: process ") and (
        "teacher.query_prompt_name: 'nope'" in errors[0]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "failed"


def test_run_reruns_a_stage_whose_input_file_changed(tmp_path, tiny_model, data_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text((data_dir / "pairs.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "mine": {"data": {"train": str(data)}, "teacher": {"model": str(tiny_model)}, "search": {"top_k": 10},
                    "filter": {"num_negatives": 2}, "cache_dir": str(tmp_path / "c")}}
    path = write_config(tmp_path / "p.yaml", cfg)

    def status():
        assert run_cli("run", "-c", str(path), "--quiet").exit_code == 0
        return json.loads((tmp_path / "run" / "summary.json").read_text())["stages"][0]["status"]

    assert status() == "ran" and status() == "skipped"
    lines = data.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # one pair less, same config
    assert status() == "ran"


def test_run_reruns_what_a_retrained_model_invalidates(tmp_path, tiny_model, data_dir):
    """After ``--force --only train`` the next ``koret run`` evaluates and pushes the new model instead of
    skipping eval with the old model's metrics; after ``--force --only mine`` filter and everything below rerun;
    a teacher folder re-trained at the same path reruns mine."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "mine": {"data": {"train": str(data_dir / "pairs.jsonl")}, "teacher": {"model": str(teacher)},
                    "search": {"top_k": 10}, "filter": {"num_negatives": 2}, "cache_dir": str(tmp_path / "c")},
           "filter": {"num_negatives": 2, "perc": 0.97},
           "train": {"model": {"name": str(tiny_model)}, "loss": {"name": "mnrl"},
                     "args": {"per_device_train_batch_size": 32, "num_train_epochs": 1, "save_steps": 1000,
                              "learning_rate": 1e-3}},
           "eval": {"data": {"path": str(data_dir / "pairs.jsonl")}, "k": [10], "cache_dir": str(tmp_path / "c")},
           "push": {"repo_id": "someone/x", "license": "apache-2.0", "dry_run": True}}
    path = write_config(tmp_path / "p.yaml", cfg)

    def statuses(*flags):
        r = run_cli("run", "-c", str(path), "--quiet", *flags)
        assert r.exit_code == 0, r.stderr
        return [s["status"] for s in json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]]

    assert statuses() == ["ran"] * 5
    assert statuses() == ["skipped"] * 5
    assert statuses("--force", "--only", "train")[2] == "ran"
    assert statuses() == ["skipped", "skipped", "skipped", "ran", "ran"]
    assert statuses("--force", "--only", "mine")[0] == "ran"
    assert statuses() == ["skipped", "ran", "ran", "ran", "ran"]
    weights = next(teacher.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # re-trained at the same path: new file, same config
    assert statuses("--until", "mine")[0] == "ran"


def test_push_config_dry_run_never_uploads(tiny_model, fake_hub, tmp_path):
    cfg = write_config(tmp_path / "push.yaml", {"model": str(tiny_model), "repo_id": "someone/x", "dry_run": True,
                                                "dry_run_dir": str(tmp_path / "staged")})
    r = run_cli("push", "-c", str(cfg), "--quiet")
    assert r.exit_code == 0, r.stderr
    assert fake_hub.calls == [], "no Hub call at all"
    assert (tmp_path / "staged" / "README.md").exists() and (tmp_path / "staged" / "modules.json").exists()


def test_card_describes_the_loss_and_data_actually_used(tmp_path, tiny_model, data_dir):
    """Plain pairs with MNRL and no mining: the card must not claim mined hard negatives or a guide."""
    cfg = {"model": {"name": str(tiny_model)}, "data": {"train": str(data_dir / "pairs.jsonl"), "limit": 16},
           "loss": {"name": "mnrl"},
           "args": {"output_dir": str(tmp_path / "train"), "per_device_train_batch_size": 8, "max_steps": 1,
                    "save_strategy": "no", "warmup_steps": 0}}
    assert run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet").exit_code == 0
    r = run_cli("push", "--set", f"model={tmp_path / 'train' / 'final'}", "--set", "repo_id=a/b", "--dry-run",
                str(tmp_path / "staged"), "--quiet")
    assert r.exit_code == 0, r.stderr
    card = (tmp_path / "staged" / "README.md").read_text()
    intro = card.split("\n# b\n", 1)[1].split("##", 1)[0]
    assert "without hard negatives" in intro and "MultipleNegativesRankingLoss (no guide model)" in intro
    assert "mined" not in intro and "GIST" not in intro
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    assert parsed.data.language == ["ko"] and parsed.data.library_name == "sentence-transformers"


def test_push_retries_only_transient_failures(tiny_model, fake_hub, monkeypatch):
    base = ["push", "--set", f"model={tiny_model}", "--set", "repo_id=someone/koret-tiny", "--quiet"]
    fake_hub.fail = {"upload_folder": [404]}
    fake_hub.calls = []
    _expect(run_cli(*base), "could not upload (HTTP 404")
    assert [c[0] for c in fake_hub.calls].count("upload_folder") == 0, "a 404 is not retried"

    real = FakeApi.upload_folder
    attempts = []

    def reset_then_ok(self, **kw):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real(self, **kw)

    fake_hub.fail = {}
    monkeypatch.setattr(FakeApi, "upload_folder", reset_then_ok)
    assert run_cli(*base).exit_code == 0 and len(attempts) == 2, "a connection reset is retried"

    def bug(self, **kw):
        attempts.append(1)
        raise TypeError("upload_folder() got an unexpected keyword argument")

    attempts.clear()
    monkeypatch.setattr(FakeApi, "upload_folder", bug)
    with pytest.raises(TypeError):
        run_cli(*base)
    assert len(attempts) == 1, "a programming error is raised at once, never retried"


def test_eval_figure_puts_the_reranker_beside_the_retriever_it_reorders():
    """The run summary's eval figure is base -> trained retriever, and the reranker over the retriever it
    reranks (it read base -> the last row, which is the reranked one)."""
    from koret.stages import _eval_figure

    res = {"k": [10], "models": [
        {"name": "base", "metrics": {"ndcg@10": 0.50}},
        {"name": "trained", "compared_with": "base", "metrics": {"ndcg@10": 0.60}},
        {"name": "reranker", "reranks": "trained", "compared_with": "trained", "metrics": {"ndcg@10": 0.65}}]}
    figure, details = _eval_figure(None, res)
    assert figure == "NDCG@10 0.5000 -> 0.6000 (+0.1000); reranker 0.6500 (+0.0500 over trained)"
    assert details == {"ndcg@10": [0.50, 0.60, 0.65]}


def test_card_takes_the_retriever_row_not_the_reranked_one(tmp_path):
    """When the pushed folder is not named in eval's rows, the card's trained row is the last retriever, never
    the reranked row after it (whose metrics are the reranker's)."""
    from koret.push import _trained_eval_entry

    ev = {"models": [{"name": "base", "model": "b"}, {"name": "trained", "model": "elsewhere/final"},
                     {"name": "trained + rr", "model": "rr/final", "reranks": "trained"}]}
    base, trained = _trained_eval_entry(ev, tmp_path / "final")
    assert base["name"] == "base" and trained["name"] == "trained"
    assert _trained_eval_entry({"models": [{"name": "base", "model": "b"}]}, tmp_path)[1] is None
