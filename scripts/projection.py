"""Projection of ``koret mine`` at scale: 10M, 100M and 1B passages x 1024 dims on 8 GPUs x 1, 2 and 8 machines.

A projection, not a measurement: it multiplies per-unit rates by the work the sharded mine does
(:mod:`koret.sharded_search`), row by row:

- **GPU memory**: the process's slice of the corpus in float16 (``encode.dtype: float16``) when it fits the
  torch search's resident threshold (70% of a free 80 GB H100), else one streamed block at a time; plus the
  scratch (``search.query_chunk_size`` x shard scores, the running top-k of the queries searched together).
- **search**: query x passage pairs of the slice / the GPU's pair rate, plus the slice's uploads (once when it
  stays resident, else once per ``QUERY_GROUP`` queries); processes run in parallel.
- **merge**: per chunk, every process receives every slice's top-k of its range of queries and merges them
  (``merge_slices``, all processes at once), then the main process gathers the merged lists: the bytes over the
  network, and the merge at the rate this script measures on this machine's CPU.
- **encode**: passages x tokens / (tokens per second per GPU x GPUs).

Rates: the GPU check's (``bench/results/gpu_check.json``, written by ``bash scripts/gpu_check.sh`` on a GPU:
the XLM-R-large-shaped encoder's tokens/s in bf16, the float16 search of a 1M x 1024 slice, the upload rate)
when it has run on a GPU; else rates assumed from the H100's data sheet, labelled so in the table. The merge
rate is measured here every run.

    python scripts/projection.py        # writes bench/results/projection.{json,md} and the table in docs/scale-out.md
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, flops_per_token, machine, update_doc  # noqa: E402

DIM = 1024
QUERIES = 1_000_000  # mining queries (a large training set); search time scales with it
K = 100  # search.top_k
TOKENS = 256  # tokens per passage
GPU_MEMORY = 80e9  # H100 80 GB
RESIDENT = 0.7  # koret.search keeps the corpus on the GPU below this fraction of free memory
CHUNK = 65_536  # queries per exchange in koret.sharded_search.search_slices
QUERY_GROUP = 262_144  # koret.search.QUERY_GROUP: queries per upload of a streamed slice
QUERY_CHUNK = 4096  # search.query_chunk_size
SHARD = 10_000  # encode.shard_size: rows of one streamed block
K_FETCH = 2 * K  # a float16 selection fetches k + max(32, k) candidates
XLMR_LARGE = dict(hidden=1024, layers=24, intermediate=4096)
H100_BF16 = 989e12


@dataclass
class Rates:
    source: str
    encode_tokens_per_s: float  # per GPU, XLM-R-large shape, bf16
    search_pairs_per_s: float  # per GPU, float16 selection + exact float32 rescoring
    upload_bytes_per_s: float  # host to one GPU
    network_bytes_per_s: float  # into the main process, across machines
    merge_elements_per_s: float  # merge_slices on the main process's CPU (measured here)


def assumed_rates(merge: float) -> Rates:
    """Data-sheet rates for an H100 (bf16 dense peak 989 TFLOP/s): the encoder at 35% MFU, the search's
    float16 matmul + top-k at 25% of peak, uploads at 10 GB/s (pageable memory-mapped host memory), 100 Gbit/s
    between machines."""
    return Rates("assumed (H100 data sheet; no GPU check has run)",
                 encode_tokens_per_s=0.35 * H100_BF16 / flops_per_token(**XLMR_LARGE, seq=TOKENS),
                 search_pairs_per_s=0.25 * H100_BF16 / (2 * DIM), upload_bytes_per_s=10e9,
                 network_bytes_per_s=12.5e9, merge_elements_per_s=merge)


def measured_rates(check: dict, merge: float) -> Rates | None:
    """Rates from a GPU check run on a GPU, or None (not run, or a CPU smoke run)."""
    if check.get("smoke") or check.get("device", "cpu") == "cpu":
        return None
    by_name = {c["check"]: c for c in check.get("checks", [])}
    enc = next((c for n, c in by_name.items() if n.startswith("encode xlmr-large")), None)
    srch = next((c for c in by_name.values() if "pairs_per_s" in c), None)
    if enc is None or srch is None:
        return None
    return Rates(f"measured: {check['device']}, {check['date']} (scripts/gpu_check.sh)",
                 encode_tokens_per_s=enc["tokens_per_s"], search_pairs_per_s=srch["pairs_per_s"],
                 upload_bytes_per_s=srch["upload_gb_per_s"] * 1e9, network_bytes_per_s=12.5e9,
                 merge_elements_per_s=merge)


def project(passages: int, machines: int, gpus: int, rates: Rates, queries: int = QUERIES) -> dict:
    """One row of the table. Pure."""
    world = machines * gpus
    rows = math.ceil(passages / world)
    slice_bytes = rows * DIM * 2  # float16
    resident = slice_bytes < RESIDENT * GPU_MEMORY
    # one query chunk's scores against a block, and the running top-k of the queries searched together (all of
    # them when the slice is resident, else one QUERY_GROUP)
    scratch = QUERY_CHUNK * SHARD * 4 + (queries if resident else min(queries, QUERY_GROUP)) * K_FETCH * 12
    uploads = 1 if resident else math.ceil(queries / QUERY_GROUP)
    search_s = queries * rows / rates.search_pairs_per_s + uploads * slice_bytes / rates.upload_bytes_per_s
    # every process merges queries / world rows of world x K (score, id) pairs, all at once; then the main
    # process receives queries x K merged pairs, the share from other machines over the network
    merged = queries * K
    off_machine = 12 * merged * (world - gpus) / world
    merge_s = merged / rates.merge_elements_per_s + 2 * off_machine / rates.network_bytes_per_s
    encode_s = passages * TOKENS / (rates.encode_tokens_per_s * world)
    return {"passages": passages, "machines": machines, "gpus": world, "slice_gib": slice_bytes / 2**30,
            "gpu_gib": (slice_bytes if resident else SHARD * DIM * 2) / 2**30 + scratch / 2**30,
            "resident": resident, "disk_per_machine_gib": slice_bytes * gpus / 2**30, "search_s": search_s,
            "merge_s": merge_s, "encode_s": encode_s}


def measure_merge_rate(world: int = 8, queries: int = 4096, repeat: int = 3) -> float:
    """Elements per second of :func:`koret.sharded_search.merge_slices` on this CPU (world x k per query)."""
    from koret.sharded_search import merge_slices

    rng = np.random.default_rng(0)
    parts = []
    for r in range(world):
        s = -np.sort(-rng.random((queries, K), dtype=np.float32), axis=1)
        parts.append((s, rng.integers(r * 10**6, (r + 1) * 10**6, size=(queries, K))))
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        merge_slices(parts, K)
        best = min(best, time.perf_counter() - t)
    return queries * world * K / best


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def markdown(rows: list[dict], rates: Rates, meta: dict) -> str:
    lines = [
        f"**Projection, not measured** ({meta['date']}; rates: {rates.source}; merge rate measured on "
        f"{meta['machine']}: {rates.merge_elements_per_s / 1e6:.0f}M elements/s). {DIM} dims, "
        f"{QUERIES:,} queries, top-{K}, corpus cached in float16, passages of {TOKENS} tokens encoded by an "
        f"XLM-R-large-shaped teacher (bge-m3, arctic-embed-l) at {rates.encode_tokens_per_s:,.0f} tokens/s a GPU; "
        f"search {rates.search_pairs_per_s:.2e} query-passage pairs/s a GPU, uploads "
        f"{rates.upload_bytes_per_s / 1e9:.0f} GB/s. Every process also holds the query embeddings in host memory "
        f"({QUERIES * DIM * 4 / 2**30:.1f} GiB in float32) and its slice's top-k ({QUERIES * K * 12 / 2**30:.1f} "
        "GiB); query encoding (short texts) is left out. `python scripts/projection.py` recomputes it.",
        "",
        "| passages | machines x GPUs | slice per GPU | GPU memory per process | cache per machine | encode | "
        "search | merge + gather to main |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        gpu = f"{r['gpu_gib']:,.1f} GiB" + ("" if r["resident"] else " (streamed)")
        lines.append(f"| {r['passages'] / 1e6:,.0f}M | {r['machines']} x {r['gpus'] // r['machines']} | "
                     f"{r['slice_gib']:,.1f} GiB | {gpu} | {r['disk_per_machine_gib']:,.0f} GiB | "
                     f"{duration(r['encode_s'])} | {duration(r['search_s'])} | {duration(r['merge_s'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    merge = measure_merge_rate()
    check_path = RESULTS / "gpu_check.json"
    check = json.loads(check_path.read_text()) if check_path.exists() else {}
    rates = measured_rates(check, merge) or assumed_rates(merge)
    rows = [project(n, m, 8, rates) for n in (10_000_000, 100_000_000, 1_000_000_000) for m in (1, 2, 8)]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "projection.json").write_text(json.dumps({**meta, "rates": asdict(rates), "rows": rows}, indent=2)
                                             + "\n")
    md = markdown(rows, rates, meta)
    (RESULTS / "projection.md").write_text(md)
    update_doc("docs/scale-out.md", "projection", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
