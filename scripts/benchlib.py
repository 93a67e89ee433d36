"""Shared pieces of the benchmarks: a local teacher, synthetic data, isolated timed runs, result files.

Every measured side runs in its own Python process (``run_side``) so that its peak RSS is its own; the child
reports wall time (imports excluded, model loading included) and its own peak RSS (``VmHWM``, not
``ru_maxrss``, which on Linux keeps the launching benchmark's peak across exec).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = Path(os.environ.get("KORET_BENCH_DIR", "/tmp/koret-bench"))


def teacher(hidden: int = 128, layers: int = 2) -> Path:
    """A local random 'lexical' BERT teacher (see tests/conftest.py): deterministic, no download."""
    from koret.synth import build_random_sentence_transformer, generate

    path = WORK / "models" / f"teacher-h{hidden}-l{layers}"
    if not (path / "modules.json").exists():
        texts = [p["query"] for p in generate(3000, seed=99).pairs] + [p["positive"]
                                                                        for p in generate(3000, seed=99).pairs]
        build_random_sentence_transformer(path, texts, seed=0, lexical=True, hidden=hidden, layers=layers,
                                          heads=2, vocab_size=4000, max_positions=130, max_seq_length=128)
    return path


def synthetic(n: int, seed: int = 0) -> Path:
    """``n`` queries with one positive each, n passages (+20% planted paraphrases in corpus.txt)."""
    from koret.synth import generate, write

    out = WORK / "data" / f"synth-{n}"
    if not (out / "train.jsonl").exists():
        write(generate(n, seed=seed, queries_per_entity=1, paraphrase_rate=0.2), out)
    return out


def run_side(name: str, code: str, args: dict[str, Any], timeout: int = 3600) -> dict[str, Any]:
    """Run ``code`` (a function body using ``args``, returning a dict) in a fresh interpreter; add wall + RSS."""
    script = (
        "import json, resource, sys, time\n"
        "args = json.loads(sys.argv[1])\n"
        f"{code}\n"
        "t0 = time.perf_counter()\n"
        "out = side(args)\n"
        "out['wall_s'] = time.perf_counter() - t0\n"
        "from koret.report import peak_rss_bytes\n"
        "out['peak_rss_mb'] = peak_rss_bytes() / 2**20\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def synthetic_shards(root: Path, n: int, dim: int, shard_rows: int, seed: int) -> list[str]:
    """``n`` random unit vectors of ``dim`` as .npy shards of ``shard_rows`` under ``root`` (made once, reused)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i, start in enumerate(range(0, n, shard_rows)):
        f = root / f"shard{i:03d}.npy"
        if not f.exists():
            x = rng.standard_normal((min(shard_rows, n - start), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(f, x)
        files.append(str(f))
    return files


def save(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def machine() -> str:
    cores = os.cpu_count()
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} cores, {cpu}"


def update_doc(page: str, section: str, md: str) -> None:
    """Put ``md`` between the ``<!-- SECTION:begin ... -->`` and ``<!-- SECTION:end -->`` lines of the docs page
    ``page`` (``docs/quality.md``): the tables the docs show are the ones the scripts wrote."""
    path = REPO / page
    text = path.read_text() if path.exists() else ""
    begin = text.find(f"<!-- {section}:begin")
    end = text.find(f"<!-- {section}:end -->")
    if begin < 0 or end < begin:
        print(f"{page} has no {section}:begin / {section}:end markers; table not copied", file=sys.stderr)
        return
    begin = text.index("\n", begin) + 1
    path.write_text(text[:begin] + md + text[end:])


def table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (printed, and written into the docs pages between markers)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def flops_per_token(hidden: int, layers: int, intermediate: int, seq: float) -> float:
    """Encoder forward FLOPs per token: 2 x (QKV, output and FFN weights) + attention (4 x seq x hidden per layer)."""
    weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return 2 * weights + layers * 4 * seq * hidden


KORQUAD = REPO.parent / "shared" / "data" / "korquad-v1-dev" / "KorQuAD_v1.0_dev.json"


def korean_texts(n: int, seed: int = 0) -> list[str]:
    """Real Korean passages and questions from ../shared/data when present, else synthetic ones."""
    path = KORQUAD
    if path.exists():
        doc = json.loads(path.read_text(encoding="utf-8"))
        texts = [p["context"] for a in doc["data"] for p in a["paragraphs"]]
        texts += [q["question"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    else:
        from koret.synth import generate

        syn = generate(n, seed=seed).pairs
        texts = [p["positive"] for p in syn] + [p["query"] for p in syn]
    import random

    random.Random(seed).shuffle(texts)
    return (texts * (n // max(len(texts), 1) + 1))[:n]
