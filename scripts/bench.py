"""make bench: every benchmark in one run (about 35 minutes on 2 CPU cores before the false-negative and LoRA benchmarks were added, which each ran alone in minutes; the whole has not been timed since); tables to bench/results/README.md
and into docs/benchmarks.md (between its bench:begin / bench:end markers).

Each benchmark runs both sides (koret and its peer) in the same run on the same data and model, and reports
ratios: absolute times on a shared 2-core machine are noise, ratios are not.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, WORK, machine, update_doc  # noqa: E402

STEPS = [
    ("bench_mine.py", []),
    ("bench_encode.py", []),
    ("bench_train.py", []),
    ("bench_eval.py", []),
    ("bench_scale.py", []),
    ("bench_shard.py", []),
    ("bench_lexical.py", []),
    ("bench_reranker.py", []),
    ("bench_lora.py", []),
    ("bench_false_negatives.py", []),
]


def main() -> int:
    here = Path(__file__).resolve().parent
    started = time.time()
    failed = []
    for script, args in STEPS:
        print(f"== {script} ==", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(here / script), *args])
        print(f"== {script}: exit {rc}, {time.time() - t0:.0f} s ==", flush=True)
        if rc != 0:
            failed.append(script)
    parts = [f"# koret benchmarks\n\n{time.strftime('%Y-%m-%d')}, {machine()}, `make bench` "
             f"({(time.time() - started) / 60:.0f} min)\n"]
    for name in ("mine", "encode", "train", "eval", "scale", "shard", "lexical", "reranker", "lora", "false_negatives"):
        md = WORK / f"{name}.md"
        if md.exists():
            parts.append(md.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "README.md").write_text("\n".join(parts))
    # the docs page has its own heading: the date line and the tables go between its markers
    update_doc("docs/benchmarks.md", "bench", "\n".join([parts[0].replace("# koret benchmarks\n\n", "", 1),
                                                         *parts[1:]]))
    print("\n".join(parts))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
