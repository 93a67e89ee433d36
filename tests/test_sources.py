"""Several named sources (data.sources): mined in one run with each row's negatives from its own source, re-filtered
by koret filter, trained with batches of one source each (proportional by weight, or round robin), on 2
processes and after a resume, listed in the model card; and the one-line errors of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import mine_config, run_cli, run_subprocess, write_config

from koret.config import MineConfig, RerankerConfig, TrainConfig, validate
from koret.data import normalize_text
from koret.errors import KoretError
from koret.sources import batch_plan, draw_counts, merge_sources

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, pairs, extra_corpus) -> dict[str, object]:
    """Sources a and b with disjoint positives and corpora, except one passage text both hold (b's corpus repeats
    one of a's positives); the passages of each, as texts."""
    root = tmp_path_factory.mktemp("sources")
    positives = sorted({r["positive"] for r in pairs})
    in_a = set(positives[::2])
    rows = {"a": [r for r in pairs if r["positive"] in in_a], "b": [r for r in pairs if r["positive"] not in in_a]}
    half = len(extra_corpus) // 2
    corpora = {"a": extra_corpus[:half], "b": extra_corpus[half:] + [positives[0]]}  # positives[0] is a's
    passages = {}
    for name in "ab":
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows[name]:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (root / f"{name}-corpus.txt").write_text("\n".join(corpora[name]) + "\n", encoding="utf-8")
        passages[name] = {normalize_text(t) for t in [r["positive"] for r in rows[name]] + corpora[name] if t.strip()}
    return {"root": root, "passages": passages, "rows": {n: len(r) for n, r in rows.items()}}


def sources_mine_config(tmp: Path, model: Path, two_sources: dict, **overrides) -> dict:
    root = two_sources["root"]
    cfg = mine_config(tmp, model, "unused", search__top_k=20, filter__perc=0.98, search__lexical={"top_k": 5},
                      **overrides)  # BM25 candidates too: each source's own index
    del cfg["data"]["train"]
    cfg["data"]["sources"] = [{"name": n, "train": str(root / f"{n}.jsonl"), "corpus": str(root / f"{n}-corpus.txt")}
                              for n in "ab"]
    return cfg


@pytest.fixture(scope="module")
def mined2(tmp_path_factory, tiny_model, two_sources) -> Path:
    """The two sources mined in one run (one process)."""
    tmp = tmp_path_factory.mktemp("mined2")
    result = run_cli("mine", "-c", str(write_config(tmp / "m.yaml", sources_mine_config(tmp, tiny_model, two_sources))),
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "out"


def train_config(tmp: Path, model: Path, mined: Path, out: str = "train", **args) -> dict:
    return {
        "model": {"name": str(model), "query_prompt_name": "query", "passage_prompt_name": "passage"},
        "data": {"sources": [{"name": "a", "train": str(mined / "train.parquet"), "weight": 3,
                              "query_prompt": "질문: "},
                             {"name": "b", "train": str(mined / "train.parquet")}]},
        "loss": {"name": "mnrl"},
        "args": {"output_dir": str(tmp / out), "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                 "logging_steps": 1, "save_steps": 3, "max_steps": 6, "warmup_steps": 0, **args},
    }


@pytest.fixture(scope="module")
def trained2(tmp_path_factory, tiny_model, mined2) -> Path:
    """A short run on both sources (weights 3:1, a's own query prompt), in process."""
    tmp = tmp_path_factory.mktemp("trained2")
    result = run_cli("train", "-c", str(write_config(tmp / "t.yaml", train_config(tmp, tiny_model, mined2))),
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    return tmp / "train"


def _negatives_of(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("negative_")]


# --------------------------------------------------------------------------------------------- mining


def test_two_sources_mined_in_one_run_take_negatives_from_their_own_source(mined2, two_sources):
    train = pd.read_parquet(mined2 / "train.parquet")
    passages = two_sources["passages"]
    assert set(train["source"]) == {"a", "b"}
    for _, row in train.iterrows():
        own = passages[row["source"]]
        assert row["positive"] in own
        assert all(row[c] in own for c in _negatives_of(train)), row["source"]
    # a's rows draw on the passage b's corpus shares with a, and not on b's own passages
    assert not any(row[c] in passages["b"] - passages["a"] for _, row in train[train.source == "a"].iterrows()
                   for c in _negatives_of(train))

    stats = json.loads((mined2 / "stats.json").read_text())
    per = stats["sources"]
    assert set(per) == {"a", "b"}
    for key in ("rows_in", "rows_out", "queries", "candidates_considered"):
        assert per["a"][key] + per["b"][key] == stats[key], key
    assert {n: per[n]["rows_out"] for n in "ab"} == train["source"].value_counts().to_dict()
    assert per["a"]["data"]["pairs"] == two_sources["rows"]["a"]
    assert sum(stats["negative_sources"].values()) == 3 * len(train) and stats["negative_sources"]["lexical"] > 0
    # the text both sources hold is one passage of the corpus, encoded once, in both sources' passages
    corpus = pd.read_parquet(mined2 / "corpus.parquet")
    every = passages["a"] | passages["b"]
    assert len(corpus) == len(every) == stats["encode"]["passages"]["texts"]
    both = corpus[corpus["sources"].map(len) == 2]
    assert len(both) == 1 and both["text"].iloc[0] in passages["a"] & passages["b"]
    candidates = pd.read_parquet(mined2 / "candidates.parquet")
    assert candidates["source"].tolist() == sorted(candidates["source"])  # each source's queries together
    assert all((mined2 / name).exists() for name in ("scores.png", "scores-a.png", "scores-b.png"))


def test_koret_filter_refilters_every_source(mined2, two_sources, tmp_path):
    same = run_cli("filter", "-c", str(mined2 / "config.yaml"), "--set", f"filter.candidates={mined2}",
                   "--set", f"output.dir={tmp_path}/same", "--quiet")
    assert same.exit_code == 0, same.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(mined2 / "train.parquet"),
                                  pd.read_parquet(tmp_path / "same" / "train.parquet"))
    # random sampling and padding with random passages: still each row's own source
    out = tmp_path / "pad"
    padded = run_cli("filter", "-c", str(mined2 / "config.yaml"), "--set", f"filter.candidates={mined2}",
                     "--set", f"output.dir={out}", "--set", "filter.perc=0.9", "--set", "filter.sampling=random",
                     "--set", "filter.on_shortage=pad_random", "--quiet")
    assert padded.exit_code == 0, padded.stderr
    train = pd.read_parquet(out / "train.parquet")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shortage"]["padded_negatives"] > 0 and set(stats["sources"]) == {"a", "b"}
    for _, row in train.iterrows():
        assert all(row[c] in two_sources["passages"][row["source"]] for c in _negatives_of(train))
    # a source of which the filter leaves no row: one line naming it, nothing written
    empty = run_cli("filter", "-c", str(mined2 / "config.yaml"), "--set", f"filter.candidates={mined2}",
                    "--set", f"output.dir={tmp_path}/none", "--set", "filter.min_score=0.999")
    assert empty.exit_code == 2 and "data.sources.a: no row is left after filtering" in empty.stderr
    assert not (tmp_path / "none" / "train.parquet").exists()


def test_merged_sources_share_a_text_once_and_the_shared_corpus_with_all():
    from koret.data import RetrievalData

    def data(queries, corpus, pairs):
        return RetrievalData(queries, corpus, [{p: 1} for _, p in pairs], pairs, [f"q{i}" for i in range(len(queries))],
                             [f"d{i}" for i in range(len(corpus))], list(range(len(corpus))), "x", "jsonl")

    a = data(["qa0", "qa1"], ["p0", "p1", "both"], [(0, 0), (1, 1)])
    b = data(["qb0"], ["both", "p2"], [(0, 1)])
    merged, index = merge_sources([("a", a), ("b", b)], shared=["s0", "p1"])
    assert merged.corpus == ["p0", "p1", "both", "p2", "s0"]
    assert merged.queries == ["qa0", "qa1", "qb0"] and merged.pairs == [(0, 0), (1, 1), (2, 3)]
    assert [p.tolist() for p in index.passages] == [[0, 1, 2, 4], [1, 2, 3, 4]]  # shared s0 and p1 in both
    assert index.query_sources().tolist() == [0, 0, 1] and index.passage_sources(5)[2] == ["a", "b"]


# --------------------------------------------------------------------------------------------- batches


def test_proportional_and_round_robin_orders():
    # proportional: a source's share of the draws is weight x batches over the total
    assert draw_counts([10, 10], [3, 1]).tolist() == [15, 5]
    assert draw_counts([30, 10], [1, 1]).tolist() == [30, 10]  # equal weights: each source's own batches
    assert draw_counts([7, 5, 1], [1, 2, 4]).tolist() == [4, 6, 3]  # 13 x (7, 10, 4) / 21, largest remainder
    plan = batch_plan([40, 40], [3, 1], "proportional", seed=42, epoch=0)
    assert len(plan) == 80 and (plan == 0).sum() == 60 and (plan == 1).sum() == 20
    assert batch_plan([40, 40], [3, 1], "proportional", seed=42, epoch=0).tolist() == plan.tolist()  # seeded
    assert batch_plan([40, 40], [3, 1], "proportional", seed=42, epoch=1).tolist() != plan.tolist()  # per epoch
    assert plan[:20].tolist() != sorted(plan[:20].tolist())  # shuffled, not in blocks
    # round robin: the sources in turn until the one with the fewest batches runs out
    assert batch_plan([5, 3, 4], [1, 1, 1], "round_robin", seed=0, epoch=0).tolist() == [0, 1, 2] * 3


def _trainer(tiny_model, mined2, tmp_path, sampler="proportional", weights=(3, 1)):
    """The trainer koret train builds for two sources, without training: its train dataloader's batches."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from koret.training.biencoder import load_train_data
    from koret.training.common import callback_class, prepare, training_arguments
    from koret.training.sources import use_sources

    cfg = train_config(tmp_path, tiny_model, mined2)
    for src, w in zip(cfg["data"]["sources"], weights, strict=True):
        src["weight"] = w
    cfg["data"]["sampler"] = sampler
    cfg = validate(TrainConfig, cfg)
    data = load_train_data(cfg)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model)
    args = training_arguments(SentenceTransformerTrainingArguments, {**cfg.args, "per_device_train_batch_size": 4},
                              has_eval=False)
    callback = callback_class()()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data.dataset,
                                         loss=dict.fromkeys(data.dataset, loss), callbacks=[callback])
    prepare(trainer)
    use_sources(trainer, [s.weight for s in data.sources], sampler, callback)
    return trainer, data


def test_every_batch_the_trainer_draws_holds_rows_of_one_source(tiny_model, mined2, tmp_path):
    trainer, data = _trainer(tiny_model, mined2, tmp_path)
    loader = trainer.get_train_dataloader()
    sizes = [len(data.dataset[n]) for n in data.dataset]
    bounds = np.cumsum([0, *sizes])
    sources = []
    for batch in loader.batch_sampler:  # the indices into the concatenation of the sources
        owner = np.searchsorted(bounds, np.asarray(batch), side="right") - 1
        assert len(set(owner.tolist())) == 1, batch
        sources.append(int(owner[0]))
    # weights 3:1: a's share of the batches is 3 x its batches over (3 x a's + b's), within rounding
    batches = [len(s) for s in loader.batch_sampler.batch_samplers]
    assert len(sources) == sum(batches) and [sources.count(0), sources.count(1)] == draw_counts(batches, [3, 1]).tolist()
    assert abs(sources.count(0) - len(sources) * 3 * batches[0] / (3 * batches[0] + batches[1])) < 1
    # the collated batches say which source they are (the prompts and the loss are chosen by it)
    names = list(data.dataset)
    seen = [b["dataset_name"] for b, _ in zip(loader, range(6), strict=False)]
    assert seen == [names[s] for s in sources[:6]]

    robin, _ = _trainer(tiny_model, mined2, tmp_path, "round_robin", (1, 1))
    order = []
    for batch in robin.get_train_dataloader().batch_sampler:
        order.append(int(np.searchsorted(bounds, batch[0], side="right") - 1))
    assert order == [0, 1] * (len(order) // 2) and len(order) == 2 * min(batches)


def test_with_several_processes_each_draw_is_one_batch_per_process_of_one_source():
    from torch.utils.data import ConcatDataset

    from koret.training.sources import SourceBatches

    class Batches:  # a source's batch sampler: consecutive indices in batches of 2
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n // 2

        def __iter__(self):
            return iter([[i, i + 1] for i in range(0, self.n - 1, 2)])

    sampler = SourceBatches(ConcatDataset([range(40), range(8)]), [Batches(40), Batches(8)], [1, 3], "proportional",
                            seed=1, group=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 24 and sampler.batch_size is None  # 20 + 4 batches, in draws of 2
    owner = [int(b[0] >= 40) for b in batches]
    assert all(owner[i] == owner[i + 1] and all((x >= 40) == owner[i] for x in batches[i] + batches[i + 1])
               for i in range(0, len(batches), 2))
    assert owner.count(1) == 2 * draw_counts([10, 2], [1, 3]).tolist()[1] == 8  # b drawn more than it has: again
    assert sum(1 for b in batches if b == [40, 41]) == 2


def test_two_processes_get_batches_of_one_source_at_each_step_and_resume_the_same_plan():
    """What each process's dataloader yields (accelerate's BatchSamplerShard over the sampler, as the trainer
    prepares it on 2 processes); and a run resumed mid-epoch in epoch 1 on 2 processes, where accelerate's
    SkipBatchSampler(BatchSamplerShard(...)) passes no set_epoch on: the sources' callback tells the epoch."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
    from torch.utils.data import ConcatDataset

    from koret.training.sources import SourceBatches, source_callback

    class Shuffled:  # a source's batch sampler, reshuffled by epoch as sentence-transformers' are
        def __init__(self, n):
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return self.n // 2

        def __iter__(self):
            order = np.random.default_rng(self.epoch).permutation(self.n).tolist()
            return iter([order[i:i + 2] for i in range(0, self.n - 1, 2)])

    def sampler():
        return SourceBatches(ConcatDataset([range(40), range(24)]), [Shuffled(40), Shuffled(24)], [1, 2],
                             "proportional", seed=3, group=2)

    whole = sampler()
    whole.set_epoch(1)  # what the trainer does at the start of epoch 1 of an uninterrupted run
    per_process = [list(BatchSamplerShard(whole, 2, p, even_batches=False)) for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1]) == len(whole) // 2
    for x, y in zip(*per_process, strict=True):  # step by step: both processes on one source
        assert len({int(i >= 40) for i in x + y}) == 1

    resumed = sampler()
    made = [resumed]
    callback = source_callback(made, SimpleNamespace(source_batches={}))
    state = SimpleNamespace(epoch=1 + 5 / len(per_process[0]))  # the checkpoint's state: 5 steps into epoch 1
    callback.on_train_begin(None, state, None)
    callback.on_epoch_begin(None, state, None)
    skipped = SkipBatchSampler(BatchSamplerShard(resumed, 2, 0, even_batches=False), 5)
    assert not hasattr(skipped, "set_epoch") and not hasattr(skipped.batch_sampler, "set_epoch")
    assert list(skipped) == per_process[0][5:]
    callback.on_epoch_begin(None, state, None)  # the next epoch of the resumed run
    assert resumed.epoch == 2


# --------------------------------------------------------------------------------------------- training


def test_training_on_two_sources_logs_each_source_and_the_card_lists_them(trained2, mined2, tmp_path):
    metrics = json.loads((trained2 / "metrics.json").read_text())
    train = pd.read_parquet(mined2 / "train.parquet")
    counts = train["source"].value_counts().to_dict()
    assert [(s["name"], s["rows"], s["weight"]) for s in metrics["sources"]] == [("a", counts["a"], 3.0),
                                                                                  ("b", counts["b"], 1.0)]
    assert metrics["train_rows"] == len(train) and metrics["sampler"] == "proportional"
    assert [s["query_prompt"] for s in metrics["sources"]] == ["질문: ", "query: "]
    assert metrics["sources"][0]["filter"]["strategy"] == "perc_pos"
    steps = metrics["loss_curve"]
    assert len(steps) == 6 and all(len(e["loss_by_source"]) == 1 for e in steps)  # one source per logged step
    assert all(e["loss_by_source"][next(iter(e["loss_by_source"]))] == pytest.approx(e["loss"], abs=1e-3)
               for e in steps)
    assert sum(s["batches"] for s in metrics["sources"]) == 6
    prompts = json.loads((trained2 / "final" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "document": "passage: ", "query_a": "질문: "}
    # what the trainer was given: each source's prompts by column (sentence-transformers picks them by the batch's
    # source)
    import torch

    given = torch.load(trained2 / "checkpoint-6" / "training_args.bin", weights_only=False).prompts
    assert {n: (p["anchor"], p["positive"], p["negative_3"]) for n, p in given.items()} == {
        "a": ("질문: ", "passage: ", "passage: "), "b": ("query: ", "passage: ", "passage: ")}

    staged = tmp_path / "staged"
    result = run_cli("push", "--set", f"model={trained2 / 'final'}", "--set", "repo_id=someone/two-sources",
                     "--dry-run", str(staged), "--quiet")
    assert result.exit_code == 0, result.stderr
    card = (staged / "README.md").read_text()
    assert f"| a | {counts['a']} | 3 |" in card and f"| b | {counts['b']} | 1 |" in card
    assert "perc_pos 0.98, 3 negatives" in card and "'질문: '" in card


def test_resume_with_two_sources_matches_the_uninterrupted_run(tmp_path, tiny_model, mined2, trained2):
    """Resuming from the uninterrupted run's step-3 checkpoint draws the same sources for steps 4-6 and ends with
    the same weights (the kill and --resume of a run are tested with one source in test_train.py)."""
    cfg = train_config(tmp_path, tiny_model, mined2, resume_from_checkpoint=str(trained2 / "checkpoint-3"))
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    reference = json.loads((trained2 / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-3") and metrics["steps"] == 6
    assert [e["step"] for e in metrics["loss_curve"]] == [4, 5, 6]
    assert [e["loss_by_source"] for e in metrics["loss_curve"]] == \
        [pytest.approx(e["loss_by_source"], abs=1e-4) for e in reference["loss_curve"][3:]]
    # the batches of each source count on from the checkpoint's: the whole run's
    assert [s["batches"] for s in metrics["sources"]] == [s["batches"] for s in reference["sources"]]
    import torch
    from safetensors.torch import load_file

    a = load_file(tmp_path / "train" / "final" / "model.safetensors")
    b = load_file(trained2 / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_mine_and_train_two_sources(tmp_path, tiny_model, two_sources, mined2):
    """koret run on 2 processes (gloo): mine writes what one process wrote, train's sources (no train of their own)
    read the run's mined file, and both processes train on one source at each step."""
    mine = sources_mine_config(tmp_path, tiny_model, two_sources, encode__shard_size=25)
    train = train_config(tmp_path, tiny_model, tmp_path, max_steps=2, per_device_train_batch_size=4)
    for src in train["data"]["sources"]:
        del src["train"]
    train["loss"]["gather_across_devices"] = True  # in-batch negatives from both processes: one source's
    del train["args"]["output_dir"]
    run = {"run": {"dir": str(tmp_path / "run")}, "mine": mine, "train": train}
    result = run_subprocess("run", "-c", str(write_config(tmp_path / "run.yaml", run)), "--num-processes", "2",
                            "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run" / "mine"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["search"]["backend"].endswith("x 2 slices") and set(stats["sources"]) == {"a", "b"}
    for name in ("train.parquet", "candidates.parquet"):  # what one process wrote
        pd.testing.assert_frame_equal(pd.read_parquet(mined2 / name), pd.read_parquet(out / name), rtol=0, atol=1e-6)
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert [(s["name"], s["train"]) for s in metrics["sources"]] == [("a", str(out / "train.parquet")),
                                                                     ("b", str(out / "train.parquet"))]
    assert all(len(e["loss_by_source"]) == 1 and np.isfinite(e["loss"]) for e in metrics["loss_curve"])
    assert sum(s["batches"] for s in metrics["sources"]) == 2 * 2  # 2 steps, a batch on each process


def test_reranker_trains_on_the_sources_of_a_mined_file(tmp_path, tiny_model, mined2):
    from koret.training.crossencoder import load_reranker_data

    train = pd.read_parquet(mined2 / "train.parquet")
    counts = train["source"].value_counts().to_dict()
    for name in ("train.parquet", "candidates.parquet"):  # data.train: split by the file's source column
        cfg = validate(RerankerConfig, {"data": {"train": str(mined2 / name), "num_negatives": 3}})
        data = load_reranker_data(cfg)
        assert list(data.dataset) == ["a", "b"] and [s.name for s in data.sources] == ["a", "b"]
        if name == "train.parquet":
            assert {n: len(d) for n, d in data.dataset.items()} == counts
    cfg = {"model": {"name": str(tiny_model), "max_length": 64},
           "data": {"sources": [{"name": "b", "train": str(mined2 / "train.parquet"), "weight": 2}]},
           "args": {"output_dir": str(tmp_path / "rr"), "per_device_train_batch_size": 8, "max_steps": 2,
                    "logging_steps": 1, "save_steps": 100}}
    result = run_cli("train-reranker", "-c", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "rr" / "metrics.json").read_text())
    assert [(s["name"], s["rows"]) for s in metrics["sources"]] == [("b", counts["b"])]
    assert all(list(e["loss_by_source"]) == ["b"] for e in metrics["loss_curve"])


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("data,message", [
    ({"sources": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}]}, "the name 'a' is given twice"),
    ({"sources": [{"train": "x"}]}, "data.sources.0.name: required key is missing"),
    ({"sources": [{"name": "a", "train": "x", "weight": 0}]}, "data.sources.0.weight: must be a finite number > 0"),
    ({"sources": [{"name": "a", "train": "x", "weight": -1}]}, "data.sources.0.weight: must be a finite number > 0"),
    ({"train": "x", "sources": [{"name": "a", "train": "y"}]}, "train and sources are both set"),
    ({"limit": 5, "sources": [{"name": "a", "train": "y"}]}, "limit and sources are both set"),
    ({"sampler": "round_robin", "sources": [{"name": "a", "train": "x", "weight": 2}]}, "takes turns without weights"),
    ({"sources": [{"name": "a b", "train": "x"}]}, "'a b' is not a source name"),
    ({"sources": [{"name": "a", "train": "x", "loss": {"name": "mnrl"}}]}, "unknown key 'data.sources.0.loss'"),
])
def test_bad_sources_are_one_line_errors(data, message):
    for schema in (TrainConfig, RerankerConfig, MineConfig):
        if "weight" in json.dumps(data) and schema is MineConfig or "sampler" in data and schema is MineConfig:
            continue  # mine has no weights or sampler
        with pytest.raises(KoretError) as err:
            validate(schema, {"data": data}, "c.yaml")
        assert message in str(err.value) and "\n" not in str(err.value), (schema.__name__, str(err.value))


def test_sources_without_rows_fail_before_any_model_loads(tmp_path, tiny_model, mined2, two_sources, monkeypatch):
    import koret.mine
    import koret.train

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(koret.train, "load_student", no_model)
    monkeypatch.setattr(koret.mine, "load_sentence_transformer", no_model)
    cfg = train_config(tmp_path, tiny_model, mined2)
    cfg["data"]["sources"][1]["name"] = "c"  # the mined file holds a and b
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)))
    assert result.exit_code == 2 and "data.sources.c.train" in result.stderr and "holds the sources a, b" in \
        result.stderr
    cfg["data"]["sources"][1] = {"name": "b", "train": str(mined2 / "train.parquet"), "sample": 1, "sample_seed": 3,
                                 "limit": None}
    cfg["data"]["sources"][0]["train"] = None
    result = run_cli("train", "-c", str(write_config(tmp_path / "t.yaml", cfg)))
    assert result.exit_code == 2 and "data.sources.a.train: required key is missing" in result.stderr

    (tmp_path / "empty.jsonl").write_text("")
    mine = sources_mine_config(tmp_path, tiny_model, two_sources)
    mine["data"]["sources"][1]["train"] = str(tmp_path / "empty.jsonl")
    result = run_cli("mine", "-c", str(write_config(tmp_path / "m.yaml", mine)))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "data.sources.b" in result.stderr and "empty" in result.stderr

    # koret run: a train source without its own file takes the mined rows of its name, checked before mining
    for one_source, wrong in ((True, "a"), (False, "c")):
        mine = sources_mine_config(tmp_path, tiny_model, two_sources)
        if one_source:  # a one-source mine's file has no source column: every source would get all its rows
            mine["data"] = {"train": str(two_sources["root"] / "a.jsonl")}
        train = train_config(tmp_path, tiny_model, tmp_path)
        for src in train["data"]["sources"]:
            del src["train"]
        train["data"]["sources"][1]["name"] = "c"
        del train["args"]["output_dir"]
        run = {"run": {"dir": str(tmp_path / "run")}, "mine": mine, "train": train}
        result = run_cli("run", "-c", str(write_config(tmp_path / "run.yaml", run)))
        assert result.exit_code == 2 and f"train.data.sources.{wrong}.train: unset" in result.stderr, result.stderr
        assert ("reads one source" if one_source else "has the sources a, b, not 'c'") in result.stderr
        assert not (tmp_path / "run" / "mine" / "train.parquet").exists()
