"""GPU check: koret's GPU paths and their throughput, with only torch + sentence-transformers + transformers.

Measures, on one GPU (models built from configs with random weights; nothing is downloaded):

1. teacher encoding tokens/s in bf16 through SentenceTransformer.encode for a BERT-base-sized and an
   XLM-R-large-sized (bge-m3 / arctic-embed-l shape) encoder, with model FLOPs utilization (MFU) against the
   card's dense bf16 peak;
2. koret's torch exact search (the path used where FAISS has no GPU) of one process's slice as ``koret mine``
   holds it: 1M x 1024 passages stored in float16, 10k queries, top-100, and the slice's upload rate (the inputs
   of the scale-out projection in docs/scale-out.md, ``scripts/projection.py``);
3. the sharded search as ``koret mine --num-processes 2`` runs it (``koret.sharded_search``, two processes under
   torchrun, each holding half of a 400k x 1024 corpus): ``search.backend: auto`` (FAISS on the process's own GPU
   where faiss-gpu is installed, else torch on CUDA in float16) and torch with bfloat16 selection, each equal to a
   float64 brute force, and each process's torch allocations on its own GPU only (``LOCAL_RANK`` modulo the GPUs);
4. ``koret train`` steps/s with cached_gist at a 1024 global batch in bf16;
4b. ``koret train`` with LoRA on a small random Qwen3-style decoder (1024 wide, 8 layers, last-token pooling): the
   frozen base loaded in bf16, sdpa attention, bf16 mixed precision, gradient checkpointing with cached_mnrl;
   checks the weights' dtype, the kernel and that the adapter trained (``lora_ok``);
5. ``accelerate launch --num_processes 1 -m koret run`` over a small config (mine, train, eval) with an
   e5-small-shaped student and teacher (384 hidden, 12 layers), checking that every teacher score stored in
   ``candidates.parquet`` is the exact float32 score recomputed from the cached embeddings.

The search check also verifies exactness: scores equal :func:`koret.search.exact_scores` bit for bit and the ids
equal a float64 brute force (ties by passage index) on 50 queries, whatever precision selected the candidates.

Prints one table and writes ``gpu_check.json`` to ``--out`` (default ``$OUT`` or ``bench/results``).
``--smoke`` runs the same code at toy sizes on the CPU (the test suite does, so the GPU run cannot fail on a typo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import flops_per_token  # noqa: E402

# dense bf16 peak FLOP/s by device name (NVIDIA data sheets, without sparsity)
PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}

SIZES = {
    "full": {"encoders": {"bert-base": dict(hidden=768, layers=12, heads=12, intermediate=3072),
                          "xlmr-large": dict(hidden=1024, layers=24, heads=16, intermediate=4096)},
             "seq": 512, "texts": 4096, "batch": 128, "passages": 1_000_000, "dim": 1024, "queries": 10_000,
             "top_k": 100, "sharded_passages": 400_000, "sharded_queries": 4000, "train_batch": 1024, "mini_batch": 128, "train_steps": 6, "train_seq": 128,
             "run_model": dict(hidden=384, layers=12, heads=12, intermediate=1536), "run_entities": 600,
             "run_batch": 64,
             "decoder": dict(hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=3072, vocab_size=8000,
                             max_positions=512), "lora_batch": 64, "lora_mini_batch": 16, "lora_steps": 4},
    "smoke": {"encoders": {"bert-base": dict(hidden=64, layers=2, heads=2, intermediate=128)},
              "seq": 32, "texts": 64, "batch": 16, "passages": 5000, "dim": 32, "queries": 200, "top_k": 10,
              "sharded_passages": 3000, "sharded_queries": 100,
              "train_batch": 16, "mini_batch": 8, "train_steps": 2, "train_seq": 32,
              "run_model": dict(hidden=32, layers=2, heads=2, intermediate=64), "run_entities": 40, "run_batch": 16,
              "decoder": dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab_size=400,
                              max_positions=128), "lora_batch": 8, "lora_mini_batch": 4, "lora_steps": 2},
}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def texts_of_length(n: int, approx_tokens: int) -> list[str]:
    from koret.synth import generate

    pieces = [p["positive"] for p in generate(max(50, n // 2), seed=3).pairs]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        words: list[str] = []
        while len(words) < approx_tokens:
            words.extend(pieces[int(rng.integers(len(pieces)))].split())
        out.append(" ".join(words[:approx_tokens]))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_encode(size: dict, workdir: Path, device: str, dtype: str) -> list[dict]:
    from koret.encode import load_sentence_transformer
    from koret.synth import build_random_sentence_transformer

    texts = texts_of_length(size["texts"], size["seq"])
    rows = []
    for name, shape in size["encoders"].items():
        path = build_random_sentence_transformer(workdir / name, texts[:2000], max_seq_length=size["seq"],
                                                 vocab_size=8000, max_positions=size["seq"] + 2, **shape)
        model = load_sentence_transformer(str(path), device=device, dtype=dtype, max_seq_length=size["seq"])
        model.encode(texts[: size["batch"]], batch_size=size["batch"])  # warm-up
        sync()
        t0 = time.perf_counter()
        model.encode(texts, batch_size=size["batch"], convert_to_numpy=True)
        sync()
        seconds = time.perf_counter() - t0
        tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                         max_length=size["seq"])["input_ids"])
        fpt = flops_per_token(shape["hidden"], shape["layers"], shape["intermediate"], size["seq"])
        peak = peak_flops()
        rows.append({"check": f"encode {name} ({dtype})", "texts_per_s": len(texts) / seconds,
                     "tokens_per_s": tokens / seconds, "mfu": tokens / seconds * fpt / peak if peak else None,
                     "seconds": seconds})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_search(size: dict, device: str) -> dict:
    """One process's slice as ``koret mine`` searches it on a GPU: float16 cache shards (``encode.dtype:
    float16``) of 250k rows, uploaded to the GPU, float16 selection, exact float32 rescoring. Also times the
    host-to-GPU upload of the slice (the projection in the README uses both rates)."""
    from koret.search import search

    gen = torch.Generator(device=device).manual_seed(0)
    shard = 250_000 if size["passages"] > 250_000 else size["passages"]
    blocks = []
    for start in range(0, size["passages"], shard):
        n = min(shard, size["passages"] - start)
        x = torch.randn(n, size["dim"], device=device, generator=gen)
        blocks.append(torch.nn.functional.normalize(x, dim=1).half().cpu().numpy())
    q = torch.nn.functional.normalize(torch.randn(size["queries"], size["dim"], device=device, generator=gen), dim=1)
    queries = q.cpu().numpy()
    sync()
    t0 = time.perf_counter()
    uploaded = [torch.from_numpy(b).to(device) for b in blocks]
    sync()
    upload_s = time.perf_counter() - t0
    del uploaded
    backend = "torch"
    t0 = time.perf_counter()
    res = search(queries, blocks, size["top_k"], backend=backend, query_chunk_size=4096, description="search")
    seconds = time.perf_counter() - t0
    # exactness on 50 queries: float64 brute force, ties by passage index; scores bit for bit
    from koret.encode import Embeddings
    from koret.search import exact_scores

    corpus = np.concatenate(blocks)
    ref = (queries[:50].astype(np.float64) @ corpus.T.astype(np.float64)).astype(np.float32)
    ref_ids = np.lexsort((np.broadcast_to(np.arange(len(corpus)), ref.shape), -ref), axis=1)[:, :size["top_k"]]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref_ids[:, :10], res.ids[:50, :10],
                                                                      strict=True)]))
    scores_exact = bool(np.array_equal(res.scores[:50], exact_scores(queries, Embeddings(blocks), res.ids[:50])))
    return {"check": f"search {size['passages']:,} x {size['dim']} top-{size['top_k']} ({res.backend}, "
                     f"{res.precision} selection)",
            "queries_per_s": size["queries"] / seconds, "seconds": seconds, "recall@10_vs_fp32": recall,
            "ids_equal_fp64": bool(np.array_equal(res.ids[:50], ref_ids)), "scores_exact": scores_exact,
            "rechecked_rows": res.rechecked, "passages": size["passages"], "dim": size["dim"],
            "pairs_per_s": size["queries"] * size["passages"] / seconds,
            "upload_gb_per_s": sum(b.nbytes for b in blocks) / upload_s / 1e9}


SHARDED_WORKER = """
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from koret import dist
from koret.encode import Embeddings
from koret.dist import slice_of
from koret.report import set_quiet
from koret.sharded_search import search_slices

set_quiet(True)
root, k = Path(sys.argv[1]), int(sys.argv[2])
if torch.cuda.is_available() and torch.cuda.device_count() < dist.world_size():
    import torch.distributed as td  # NCCL cannot put two ranks on one GPU: gloo carries the lists, the GPU searches
    td.init_process_group("gloo")
files = sorted(root.glob("shard-*.npy"))
mine = slice_of(len(files), dist.rank(), dist.world_size())
local = Embeddings([np.load(files[i], mmap_mode="r") for i in mine],
                   start=sum(len(np.load(f, mmap_mode="r")) for f in files[:mine.start]))
n = sum(len(np.load(f, mmap_mode="r")) for f in files)
queries = np.load(root / "queries.npy")
report = {}
dist.barrier()  # the process group starts here, outside the timings
for name, kwargs in (("auto", {}), ("bfloat16", {"backend": "torch", "precision": "bfloat16"})):
    t0 = time.perf_counter()
    res = search_slices(queries, local, n, k, **kwargs)
    seconds = time.perf_counter() - t0
    used = [d for d in range(torch.cuda.device_count()) if torch.cuda.max_memory_allocated(d) > 0]
    placement = dist.gather_to_main({"local_rank": dist.local_rank(), "gpus": torch.cuda.device_count(),
                                     "torch_gpus_used": used})
    if dist.is_main():
        np.savez(root / f"out-{name}.npz", ids=res.ids, scores=res.scores)
        report[name] = {"backend": res.backend, "seconds": seconds, "rechecked": res.rechecked,
                        "processes": placement}
if dist.is_main():
    (root / "report.json").write_text(json.dumps(report))
"""


def check_sharded_search(size: dict, workdir: Path) -> dict:
    """``koret.sharded_search`` on two processes (torchrun), as ``koret mine --num-processes 2`` searches: each
    process holds half of the corpus shards. Runs ``backend: auto`` and torch with bfloat16 selection; checks ids
    against a float64 brute force (ties by passage index) and scores against :func:`koret.search.exact_scores` on
    up to 50 queries, and that each process's torch allocations are on its own GPU (``LOCAL_RANK`` modulo the
    GPUs; torch's allocator only, so a faiss-gpu search shows none)."""
    import subprocess

    from koret.dist import _free_port
    from koret.encode import Embeddings
    from koret.search import exact_scores

    root = workdir / "sharded"
    root.mkdir()
    rng = np.random.default_rng(0)
    n, dim, k = size["sharded_passages"], size["dim"], size["top_k"]
    shard = max(1, n // 8)
    corpus = []
    for i, start in enumerate(range(0, n, shard)):
        x = rng.standard_normal((min(shard, n - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / f"shard-{i:03d}.npy", x)
        corpus.append(x)
    q = rng.standard_normal((size["sharded_queries"], dim), dtype=np.float32)
    queries = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.save(root / "queries.npy", queries)
    (root / "worker.py").write_text(SHARDED_WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(root / "worker.py"), str(root), str(k)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=root)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"2-process search exited {proc.returncode}: {' | '.join(proc.stderr.splitlines()[-8:])}")
    report = json.loads((root / "report.json").read_text())
    full = np.concatenate(corpus)
    m = min(50, len(queries))
    ref = (queries[:m].astype(np.float64) @ full.T.astype(np.float64)).astype(np.float32)
    ref_ids = np.lexsort((np.broadcast_to(np.arange(len(full)), ref.shape), -ref), axis=1)[:, :k]
    exact = {}
    for name in report:
        got = np.load(root / f"out-{name}.npz")
        exact[name] = (bool(np.array_equal(got["ids"][:m], ref_ids)),
                       bool(np.array_equal(got["scores"][:m], exact_scores(queries, Embeddings(corpus),
                                                                             got["ids"][:m]))))
    # with one GPU both processes share it by design: the placement is untested there (None), not "own"
    own = [p["torch_gpus_used"] == [p["local_rank"] % p["gpus"]] for r in report.values() if "torch" in r["backend"]
           for p in r["processes"]] if torch.cuda.is_available() and torch.cuda.device_count() > 1 else []
    auto, bf16 = report["auto"], report["bfloat16"]
    return {"check": f"2-process search {n:,} x {dim} top-{k}: auto ({auto['backend']}) and torch bfloat16",
            "queries_per_s": len(queries) / auto["seconds"], "bf16_queries_per_s": len(queries) / bf16["seconds"],
            "seconds": seconds, "ids_equal_fp64": all(i for i, _ in exact.values()),
            "scores_exact": all(sc for _, sc in exact.values()), "exact_by_variant": exact,
            "rechecked_rows": {name: r["rechecked"] for name, r in report.items()},
            "own_gpu": all(own) if own else None, "placement": {name: r["processes"] for name, r in report.items()}}


def bench_train(size: dict, workdir: Path, bf16: bool) -> dict:
    import pandas as pd

    from koret.config import TrainConfig
    from koret.synth import build_random_sentence_transformer, generate
    from koret.train import train

    syn = generate(max(200, size["train_batch"] * size["train_steps"] // 2 + 50), seed=5)
    rng = np.random.default_rng(0)
    passages = [p["positive"] for p in syn.pairs]
    rows = [{"anchor": p["query"], "positive": p["positive"],
             **{f"negative_{j}": passages[int(rng.integers(len(passages)))] for j in (1, 2, 3)}}
            for p in syn.pairs]
    data = workdir / "train.parquet"
    pd.DataFrame(rows).to_parquet(data)
    shape = size["encoders"]["bert-base"]
    model = build_random_sentence_transformer(workdir / "student", passages[:2000], max_seq_length=size["train_seq"],
                                              vocab_size=8000, max_positions=size["train_seq"] + 2, **shape)
    cfg = TrainConfig.model_validate({
        "model": {"name": str(model), "max_seq_length": size["train_seq"]},
        "data": {"train": str(data)},
        "loss": {"name": "cached_gist", "guide": "student", "mini_batch_size": size["mini_batch"]},
        "args": {"output_dir": str(workdir / "train"), "per_device_train_batch_size": size["train_batch"],
                 "max_steps": size["train_steps"], "bf16": bf16, "logging_steps": 1, "save_strategy": "no",
                 "batch_sampler": "batch_sampler", "dataloader_drop_last": True},
    })
    m = train(cfg)
    return {"check": f"koret train cached_gist, global batch {m['global_batch_size']} ({m['precision']})",
            "steps_per_s": m["steps_per_second"], "samples_per_s": m["samples_per_second"],
            "tokens_per_s": m["tokens_per_second"], "peak_cuda_gib": (m.get("peak_cuda_bytes") or 0) / 2**30,
            "seconds": m["train_runtime"]}


def check_lora(size: dict, workdir: Path) -> dict:
    """``koret train`` with LoRA on a small random Qwen3-style decoder (last-token pooling): the frozen base in
    bfloat16 (``model.dtype: auto``), the adapter in float32, sdpa attention, bf16 mixed precision by default,
    gradient checkpointing with a cached loss; checks the base loaded in bf16 with sdpa and the adapter trained."""
    import pandas as pd
    from safetensors.torch import load_file

    from koret.config import TrainConfig
    from koret.synth import build_random_decoder, generate
    from koret.train import train

    syn = generate(max(200, size["lora_batch"] * size["lora_steps"]), seed=6, queries_per_entity=1)
    rows = [{"anchor": p["query"], "positive": p["positive"]} for p in syn.pairs]
    data = workdir / "lora-pairs.parquet"
    pd.DataFrame(rows).to_parquet(data)
    shape = size["decoder"]
    lm = build_random_decoder(workdir / "decoder", [r["anchor"] for r in rows] + [r["positive"] for r in rows],
                              **shape)
    cfg = TrainConfig.model_validate({
        "model": {"name": str(lm), "pooling": "lasttoken", "attn_implementation": "sdpa", "max_seq_length": 128,
                  "query_prompt": "Instruct: Given a Korean question, retrieve passages that answer it\nQuery:",
                  "lora": {"r": 16, "alpha": 32}},
        "data": {"train": str(data)},
        "loss": {"name": "cached_mnrl", "mini_batch_size": size["lora_mini_batch"]},
        "args": {"output_dir": str(workdir / "lora"), "per_device_train_batch_size": size["lora_batch"],
                 "max_steps": size["lora_steps"], "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no",
                 "gradient_checkpointing": True},
    })
    m = train(cfg)
    adapter = load_file(workdir / "lora" / "final" / "adapter" / "adapter_model.safetensors")
    trained = any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    cuda = torch.cuda.is_available()
    ok = (m["attn_implementation"] == "sdpa" and m["gradient_checkpointing"] and trained
          and (m["weights_dtype"] == "bfloat16" and m["precision"] == "bf16" if cuda else True))
    return {"check": f"lora train decoder h{shape['hidden']} x {shape['layers']} ({m['precision']}, "
                     f"{m['attn_implementation']}, weights {m['weights_dtype']})",
            "steps_per_s": m["steps_per_second"], "samples_per_s": m["samples_per_second"],
            "tokens_per_s": m["tokens_per_second"], "peak_cuda_gib": (m.get("peak_cuda_bytes") or 0) / 2**30,
            "trainable_parameters": m["lora"]["trainable_parameters"], "total_parameters": m["lora"]["total_parameters"],
            "adapter_trained": trained, "lora_ok": ok, "seconds": m["train_runtime"]}


def check_run(size: dict, workdir: Path) -> dict:
    """``accelerate launch --num_processes 1 -m koret run`` over a small config; stored scores are exact fp32."""
    import subprocess

    import pyarrow.parquet as pq
    import yaml

    from koret.encode import open_shard_files
    from koret.search import exact_scores
    from koret.synth import build_random_sentence_transformer, generate, write

    syn = generate(size["run_entities"], seed=11, paraphrase_rate=0.2)
    files = write(syn, workdir / "data", eval_fraction=0.2, seed=11)
    texts = [p["query"] for p in syn.pairs] + [p["positive"] for p in syn.pairs]
    model = build_random_sentence_transformer(workdir / "e5-small-shape", texts, max_seq_length=128,
                                              prompts={"query": "query: ", "document": "passage: "},
                                              vocab_size=8000, max_positions=130, **size["run_model"])
    root = workdir / "run"
    cfg = {"run": {"dir": str(root)},
           "mine": {"data": {"train": files["train.jsonl"], "corpus": files["corpus.txt"]},
                    "teacher": {"model": str(model), "batch_size": 128}, "search": {"top_k": 30},
                    "filter": {"strategy": "naive", "num_negatives": 3}, "cache_dir": str(workdir / "cache")},
           "train": {"model": {"name": str(model)}, "loss": {"name": "cached_gist", "mini_batch_size": 16},
                     "args": {"per_device_train_batch_size": size["run_batch"], "max_steps": 10, "logging_steps": 5,
                              "save_strategy": "no", "bf16": torch.cuda.is_available()}},
           "eval": {"data": {"path": files["eval.jsonl"]}, "k": [1, 10], "cache_dir": str(workdir / "cache")}}
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *([] if torch.cuda.is_available() else ["--cpu"]),
           "-m", "koret", "run", "-c", str(path), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")] or \
            proc.stderr.strip().splitlines()[-15:]
        raise RuntimeError(f"koret run exited {proc.returncode}: {' | '.join(tail)}")
    summary = json.loads((root / "summary.json").read_text())
    cand = pq.read_table(root / "mine" / "candidates.parquet").to_pandas()
    emb = json.loads((root / "mine" / "embeddings.json").read_text())
    passages, queries = open_shard_files(emb["passages"]), open_shard_files(emb["queries"])
    ids = np.concatenate(cand["candidate_ids"].to_numpy())
    rows = np.repeat(np.arange(len(cand)), cand["candidate_ids"].map(len).to_numpy())
    stored = np.concatenate(cand["teacher_candidate_scores"].to_numpy()).astype(np.float32)
    exact = exact_scores(queries.to_array(), passages, ids, rows=rows)
    figures = {s["stage"]: s["figure"] for s in summary["stages"]}
    return {"check": "accelerate launch --num_processes 1 -m koret run (mine, train, eval)", "seconds": seconds,
            "stages": [s["status"] for s in summary["stages"]], "eval": figures.get("eval", ""),
            "stored_scores_exact_fp32": bool(stored.dtype == np.float32 and np.array_equal(stored, exact)),
            "candidates": int(len(ids))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes; runs on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    from koret.report import set_quiet

    set_quiet(True)
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d"), "peak_bf16_flops": peak_flops(), "smoke": args.smoke,
                     "checks": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for step in (lambda: bench_encode(size, work, device, dtype), lambda: [bench_search(size, device)],
                     lambda: [check_sharded_search(size, work)], lambda: [bench_train(size, work, bf16=cuda)],
                     lambda: [check_lora(size, work)], lambda: [check_run(size, work)]):
            try:
                results["checks"].extend(step())
            except Exception as exc:  # report and go on: one failing check must not hide the others
                results["checks"].append({"check": "error", "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results["checks"][-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}  torch {results['torch']}  {results['date']}")
    print(f"{'check':<62} {'throughput':>28} {'MFU':>6} {'seconds':>8}")
    for c in results["checks"]:
        if c["check"] == "error":
            print(f"ERROR {c['error']}")
            continue
        if "stored_scores_exact_fp32" in c:
            thr = f"{c['eval']}; exact fp32: {c['stored_scores_exact_fp32']}"
        elif "tokens_per_s" in c and "steps_per_s" not in c:
            thr = f"{c['tokens_per_s']:,.0f} tokens/s"
        elif "steps_per_s" in c:
            thr = f"{c['steps_per_s']:.2f} steps/s ({c['samples_per_s']:,.0f} samples/s)"
        else:
            thr = f"{c['queries_per_s']:,.0f} queries/s, exact: {c['ids_equal_fp64'] and c['scores_exact']}"
        mfu = f"{c['mfu']:.2f}" if c.get("mfu") else "-"
        print(f"{c['check']:<62} {thr:>28} {mfu:>6} {c['seconds']:>8.1f}")
    inexact = [c["check"] for c in results["checks"] if c.get("scores_exact") is False
               or c.get("ids_equal_fp64") is False or c.get("stored_scores_exact_fp32") is False]
    for name in inexact:
        print(f"NOT EXACT: {name}")
    for c in results["checks"]:
        if c.get("lora_ok") is False:
            print(f"LORA NOT AS EXPECTED: {c['check']}")
            inexact.append(c["check"])
    misplaced = [c["check"] for c in results["checks"] if c.get("own_gpu") is False]
    for name in misplaced:
        print(f"NOT ON ITS OWN GPU: {name}")
    inexact += misplaced
    return 1 if inexact or any(c["check"] == "error" for c in results["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
