"""koret push --dataset: the mined data as a Hub dataset repo (network boundary patched), its dataset card, the
license it needs, and the token kept out of every file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import mine_config, run_cli, write_config
from test_push_run import TOKEN, FakeApi, fake_hub  # noqa: F401 - fake_hub: HfApi recorded in FakeApi.calls


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_model, pairs, data_dir):
    """A one-source mine (data.train) and a two-source mine (data.sources, with shared data.corpus)."""
    root = tmp_path_factory.mktemp("mined")
    one = mine_config(root, tiny_model, data_dir / "pairs.jsonl", out="one", filter={"num_negatives": 2, "strategy": "perc_pos", "perc": 0.98})
    assert run_cli("mine", "-c", str(write_config(root / "one.yaml", one)), "--quiet").exit_code == 0
    for name, rows in (("wiki", pairs[:40]), ("news", pairs[40:80])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    two = mine_config(root, tiny_model, "", out="two", filter={"num_negatives": 2, "strategy": "perc_pos", "perc": 0.98})
    two["data"] = {"sources": [{"name": n, "train": str(root / f"{n}.jsonl")} for n in ("wiki", "news")],
                   "corpus": str(data_dir / "corpus.txt")}
    r = run_cli("mine", "-c", str(write_config(root / "two.yaml", two)), "--quiet")
    assert r.exit_code == 0, r.stderr
    return root / "one", root / "two"


def _card(folder: Path):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(folder / "README.md")


@pytest.mark.usefixtures("fake_hub")
def test_dry_run_stages_the_mined_files_and_a_dataset_card(tmp_path, mined):
    one, _ = mined
    out = tmp_path / "staged"
    r = run_cli("push", "--dataset", str(one), "--dry-run", str(out), "--set", "dataset.repo_id=someone/ko-negatives",
                "--set", "dataset.license=cc-by-sa-4.0", "--set", "dataset.candidates=true", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert FakeApi.calls == [], "a dry run makes no Hub call"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "candidates.parquet", "corpus.parquet", "scores.png", "stats.json", "train.parquet"]
    for f in ("train.parquet", "candidates.parquet", "stats.json"):
        assert (out / f).read_bytes() == (one / f).read_bytes(), f

    stats = json.loads((one / "stats.json").read_text())
    card = _card(out)
    meta = card.data.to_dict()
    assert meta["license"] == "cc-by-sa-4.0" and meta["language"] == ["ko"] and "koret" in meta["tags"]
    assert [c["config_name"] for c in meta["configs"]] == ["default", "candidates", "corpus"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "train.parquet"}]
    k = meta["koret"]
    assert k["teacher"] == stats["teacher"]["model"] and k["rows"] == stats["rows_out"] == pq.read_metadata(
        out / "train.parquet").num_rows
    assert k["prompts"] == {"query": "query: ", "passage": "passage: "}, "the prompts the teacher used"
    assert k["filter"] == stats["settings"] and k["filter"]["perc"] == 0.98 and k["score_kind"] == stats["score_kind"]
    assert k["sources"] == [{"name": "pairs", "data": stats["data"]["source"], "license": "cc-by-sa-4.0",
                             "rows": stats["rows_out"]}]
    body = card.text
    assert f"| pairs | `{stats['data']['source']}` | cc-by-sa-4.0 | {stats['rows_out']:,} |" in body
    assert f"| (query, positive) rows in / written | {stats['rows_in']:,} / {stats['rows_out']:,} |" in body
    assert "| perc | 0.98 |" in body and "| strategy | perc_pos |" in body and "candidates.parquet" in body
    assert 'load_dataset("someone/ko-negatives", split="train")' in body


def test_two_sources_have_their_rows_and_licenses(tmp_path, mined):
    _, two = mined
    out = tmp_path / "staged"
    licenses = ["--set", "dataset.licenses.wiki=cc-by-sa-4.0", "--set", "dataset.licenses.news=cc-by-4.0"]
    # every source needs its license, the shared extra passages too: refused, nothing staged
    r = run_cli("push", "--dataset", str(two), "--dry-run", str(out), *licenses)
    assert r.exit_code == 2 and not out.exists()
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: dataset.licenses.data.corpus: no license for source"), line
    r = run_cli("push", "--dataset", str(two), "--dry-run", str(out), *licenses, "--set", "dataset.licenses.wikii=x")
    assert r.exit_code == 2 and "dataset.licenses.wikii: no source of the mined data is named 'wikii'" in r.stderr
    # the hint's own words work: the shared passages' name has a dot, and --set still reaches it
    r = run_cli("push", "--dataset", str(two), "--dry-run", str(out), *licenses,
                "--set", "dataset.licenses.data.corpus=cc0-1.0", "--quiet")
    assert r.exit_code == 0, r.stderr
    counts = {}
    for name in pq.read_table(two / "train.parquet", columns=["source"]).column("source").to_pylist():
        counts[name] = counts.get(name, 0) + 1
    assert set(counts) == {"wiki", "news"} and all(counts.values())
    meta = _card(out).data.to_dict()
    assert meta["license"] == ["cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0"]
    assert [(s["name"], s["license"], s["rows"]) for s in meta["koret"]["sources"]] == [
        ("wiki", "cc-by-sa-4.0", counts["wiki"]), ("news", "cc-by-4.0", counts["news"]),
        ("data.corpus", "cc0-1.0", None)]
    assert sum(counts.values()) == meta["koret"]["rows"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "scores-news.png", "scores-wiki.png", "scores.png",
                                                     "stats.json", "train.parquet"]
    body = _card(out).text
    assert "The `source` column names each row's source." in body and "from 2 source(s)" in body
    stats = json.loads((two / "stats.json").read_text())
    for name in ("wiki", "news"):
        st = stats["sources"][name]
        assert st["rows_out"] == counts[name]
        assert f"| {name} | {st['queries']:,} | {st['rows_in']:,} | {counts[name]:,} | {st['shortage']['rows']:,} |" in body


@pytest.mark.usefixtures("fake_hub")
def test_no_license_is_refused(tmp_path, mined):
    one, _ = mined
    r = run_cli("push", "--dataset", str(one), "--set", "dataset.repo_id=someone/ko-negatives")
    assert r.exit_code == 2 and FakeApi.calls == []
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("error: dataset.licenses.pairs: no license for source 'pairs'"), line
    assert "dataset.license" in line


@pytest.mark.usefixtures("fake_hub")
def test_dataset_upload_keeps_the_token_out_of_every_file(tmp_path, mined):
    one, _ = mined
    cfg = write_config(tmp_path / "push.yaml", {"private": True, "revision": "v1", "dataset": {
        "repo_id": "someone/ko-negatives", "mine_dir": str(one), "license": "cc-by-sa-4.0"}})
    r = run_cli("push", "-c", str(cfg))
    assert r.exit_code == 0, r.stderr
    assert [c[0] for c in FakeApi.calls] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[0][1] == {"token_given": True}
    create, branch, upload = (c[1] for c in FakeApi.calls[1:])
    assert create["repo_type"] == "dataset" and create["private"] is True and create["repo_id"] == "someone/ko-negatives"
    assert branch["repo_type"] == "dataset" and branch["branch"] == "v1"
    assert upload["repo_type"] == "dataset" and upload["revision"] == "v1"
    assert upload["commit_message"] == "Upload hard negatives mined with koret"
    assert upload["files"] == ["README.md", "scores.png", "stats.json", "train.parquet"]
    assert "https://huggingface.co/datasets/someone/ko-negatives/tree/v1" in r.stdout + r.stderr
    assert TOKEN not in r.stdout + r.stderr + upload["card"]
    for f in [*tmp_path.rglob("*"), *one.rglob("*")]:
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    bad = write_config(tmp_path / "bad.yaml", {"dataset": {"mine_dir": str(one), "license": "mit"}})
    r = run_cli("push", "-c", str(bad))
    assert r.exit_code == 2 and "dataset.repo_id: required key is missing" in r.stderr
    r = run_cli("push", "--dataset", str(tmp_path / "nothing"), "--set", "dataset.license=mit")
    assert r.exit_code == 2 and "dataset.mine_dir: folder not found" in r.stderr


def test_run_refuses_a_dataset_section_before_any_stage(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "run.yaml", {"run": {"dir": str(tmp_path / "run")},
                                               "push": {"model": str(tiny_model), "dataset": {"license": "mit"}}})
    r = run_cli("config", "validate", "-c", str(cfg))
    assert r.exit_code == 2 and "push.dataset: koret run's push stage uploads the model" in r.stderr


def test_a_filter_folder_names_the_sources_of_its_mine(tmp_path, mined):
    """koret filter given only filter settings (no data section): the pushed sources are its mine's, with the rows
    the filter kept; a blank license is no license."""
    _, two = mined
    cfg = write_config(tmp_path / "filter.yaml", {"filter": {"candidates": str(two), "perc": 0.9, "num_negatives": 2},
                                                  "output": {"dir": str(tmp_path / "filtered")}})
    r = run_cli("filter", "-c", str(cfg), "--quiet")
    assert r.exit_code == 0, r.stderr
    filtered, out = tmp_path / "filtered", tmp_path / "staged"
    licenses = ["--set", "dataset.licenses.wiki=cc-by-sa-4.0", "--set", "dataset.licenses.news=cc-by-4.0"]
    r = run_cli("push", "--dataset", str(filtered), "--dry-run", str(out), *licenses, "--set", "dataset.license=' '")
    assert r.exit_code == 2 and "dataset.licenses.data.corpus: no license for source" in r.stderr and not out.exists()
    r = run_cli("push", "--dataset", str(filtered), "--dry-run", str(out), *licenses,
                "--set", "dataset.licenses.data.corpus=cc0-1.0", "--quiet")
    assert r.exit_code == 0, r.stderr
    counts: dict[str, int] = {}
    for name in pq.read_table(filtered / "train.parquet", columns=["source"]).column("source").to_pylist():
        counts[name] = counts.get(name, 0) + 1
    sources = _card(out).data.to_dict()["koret"]["sources"]
    assert [(s["name"], s["rows"]) for s in sources] == [("wiki", counts["wiki"]), ("news", counts["news"]),
                                                         ("data.corpus", None)]
