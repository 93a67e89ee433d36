"""Benchmark: full fine-tuning vs LoRA vs LoRA + gradient checkpointing of a small decoder on CPU.

One small random Qwen3-style decoder (built locally, last-token pooling), the same data, loss, batch and steps
on every side, each through ``koret train`` in its own process: seconds per step and peak RSS, and their ratios to
full fine-tuning, in the same run. A fourth side, LoRA with dropout 0, shows what the adapter's dropout keeps
(peft stores a dropped-out copy of every adapted layer's input for backward). Peak RSS counts the Python/torch
process too, so the table also shows peak RSS minus the RSS before ``koret train`` started (the model, data,
optimizer and activations).

Every side runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises
the threshold as large blocks are freed, after which a step's freed activations stay in the heap and count in RSS,
so that peak RSS no longer follows what a side holds. Without it, LoRA + gradient checkpointing, which saves a
small fraction of the tensors full fine-tuning saves for backward, measured the same peak RSS as full
fine-tuning (the first recorded run, without this setting: 1.00x; docs/benchmarks.md).

    python scripts/bench_lora.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import WORK, run_side, save, table  # noqa: E402

MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default starting value, kept fixed (see the module doc)
SHAPE = {"hidden": 384, "layers": 4, "heads": 6, "kv_heads": 2, "intermediate": 1152, "vocab_size": 8000,
         "max_positions": 256}

KORET = """
def side(a):
    import sentence_transformers, torch, transformers  # imported before the RSS baseline
    from koret.config import TrainConfig
    from koret.report import set_quiet
    from koret.train import train
    set_quiet(True)
    torch.set_num_threads(a["threads"])
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    before = rss_mb()
    cfg = TrainConfig.model_validate({
        "model": {"name": a["model"], "pooling": "lasttoken", "max_seq_length": a["max_len"], "lora": a["lora"]},
        "data": {"train": a["data"]},
        "loss": {"name": "mnrl"},
        "args": {"output_dir": a["out"], "per_device_train_batch_size": a["batch"], "max_steps": a["steps"],
                 "learning_rate": 1e-4, "save_strategy": "no", "logging_steps": 1, "seed": 42, "warmup_steps": 0,
                 "gradient_checkpointing": a["gc"]}})
    m = train(cfg)
    return {"s_per_step": m["train_runtime"] / m["steps"], "steps": m["steps"], "rss_before_mb": before,
            "trainable": (m["lora"] or {}).get("trainable_parameters"),
            "total": (m["lora"] or {}).get("total_parameters"), "final_loss": m["final_loss"],
            "gradient_checkpointing": m["gradient_checkpointing"], "tokens_per_row": m["tokens_per_row"]}
"""


def decoder() -> Path:
    """The small decoder: a random Qwen3-style causal LM (built once), tokenizer trained on synthetic Korean."""
    from koret.synth import build_random_decoder, generate

    path = WORK / "models" / "decoder-h{hidden}-l{layers}".format(**SHAPE)
    if not (path / "config.json").exists():
        syn = generate(3000, seed=99).pairs
        build_random_decoder(path, [p["query"] for p in syn] + [p["positive"] for p in syn], seed=0, **SHAPE)
    return path


def pairs(n: int) -> Path:
    """(query, passage) rows whose passage is the positive followed by three other passages: documents of about
    100 tokens, where activations weigh as they do in retrieval training."""
    import random

    import pandas as pd

    from koret.synth import generate

    path = WORK / "data" / f"lora-pairs-{n}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        syn = generate(n, seed=4, queries_per_entity=1).pairs
        rng = random.Random(0)
        passages = [p["positive"] for p in syn]
        rows = [{"anchor": p["query"], "positive": " ".join([p["positive"], *rng.sample(passages, 3)])} for p in syn]
        pd.DataFrame(rows).to_parquet(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side (one: steady on a "
                                                                  "shared machine)")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # run_side's processes inherit it (module doc)
    model, data = str(decoder()), str(pairs(2000))
    common = {"model": model, "data": data, "batch": args.batch, "steps": args.steps, "max_len": 128,
              "threads": args.threads}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05}
    sides = {}
    for key, name, extra in (("full", "full fine-tuning", {"lora": None, "gc": False}),
                             ("lora", "LoRA r 16", {"lora": lora, "gc": False}),
                             ("lora-gc", "LoRA r 16 + gradient checkpointing", {"lora": lora, "gc": True}),
                             ("lora-nodrop", "LoRA r 16, dropout 0 (no dropped-out copy of each adapted layer's input)",
                              {"lora": {**lora, "dropout": 0.0}, "gc": False})):
        sides[name] = run_side(name, KORET, {**common, **extra, "out": str(WORK / f"lora-{key}")})
        print(json.dumps({name: sides[name]}), flush=True)
    full = sides["full fine-tuning"]
    for s in sides.values():
        s["growth_mb"] = s["peak_rss_mb"] - s["rss_before_mb"]
        s["time_ratio"] = s["s_per_step"] / full["s_per_step"]
        s["rss_ratio"] = s["peak_rss_mb"] / full["peak_rss_mb"]
        s["growth_ratio"] = s["growth_mb"] / full["growth_mb"]
    save("lora", {"model": "random Qwen3-style decoder, hidden {hidden}, {layers} layers, {heads} heads ({kv_heads} "
                           "KV), intermediate {intermediate}, vocabulary {vocab_size}, last-token pooling".format(**SHAPE),
                  "loss": "mnrl (anchor, positive)", "batch": args.batch, "steps": args.steps, "max_seq_length": 128,
                  "torch_threads": args.threads, "malloc_mmap_threshold": MMAP_THRESHOLD,
                  "lora": lora, "sides": sides})
    lora_side = sides["LoRA r 16"]
    md = table(f"LoRA vs full fine-tuning: a random Qwen3-style decoder (hidden {SHAPE['hidden']}, {SHAPE['layers']} "
               f"layers, {lora_side['total'] - lora_side['trainable']:,} parameters) on CPU ({args.threads} torch thread(s), "
               f"glibc mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB), "
               f"koret train, mnrl, batch {args.batch}, "
               f"{args.steps} steps, {full['tokens_per_row']:.0f} tokens per (query, passage) row; LoRA r 16, "
               f"{lora_side['trainable']:,} trainable parameters; ratios to full fine-tuning, same run",
               ["", "s / step", "time ratio", "peak RSS MB", "RSS ratio", "peak RSS - RSS before koret train MB",
                "ratio of that"],
               [[name, s["s_per_step"], f"{s['time_ratio']:.2f}x", s["peak_rss_mb"], f"{s['rss_ratio']:.2f}x",
                 s["growth_mb"], f"{s['growth_ratio']:.2f}x"] for name, s in sides.items()])
    print(md)
    (WORK / "lora.md").write_text(md)  # scripts/bench.py collects it
    return 0


if __name__ == "__main__":
    sys.exit(main())
