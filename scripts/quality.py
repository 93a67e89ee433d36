"""The quality study (``make quality``): koret's recipe options on a model that already reads Korean.

Model: multilingual-e5-small (``../shared/tools/make-e5-small.sh``) as teacher, guide and student, with its own
prompts. Data: KorQuAD 1.0 dev split by article: mine and train on articles 0-111, evaluate on 112-139 (1,456
questions over their passages). Every arm is a run of koret's own commands (``koret mine``, ``koret filter``,
``koret train``, ``koret eval``) with the same seed, the same number of training rows and steps; each is
compared with the untrained model on the same queries (paired bootstrap 95% CI of the gain and a paired
randomization p-value, :mod:`koret.significance`), and a few arms with each other.

Sized for this project's 2-core CPU machine (about 15 minutes an arm; ``--steps``, ``--batch``,
``--max-seq-length`` change it). It resumes where it stopped: mining, filtering and each arm are skipped when their outputs exist,
and a killed training continues from its last checkpoint. Outputs: ``runs/quality/`` (everything),
``bench/results/quality.json`` and ``bench/results/quality.md`` (the table docs/quality.md shows).

    python scripts/quality.py [--arms base,perc_mnrl,...] [--steps 50] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import update_doc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KORET_SHARED", REPO.parent / "shared"))  # this project's shared/ beside the clone
DATA = SHARED / "data" / "korquad-v1-dev" / "KorQuAD_v1.0_dev.json"
E5_BUILDER = SHARED / "tools" / "make-e5-small.sh"
RESULTS = REPO / "bench" / "results"
TRAIN_ARTICLES, EVAL_ARTICLES = "0:112", "112:140"
HEADLINE = ("ndcg@10", "mrr@10", "recall@10", "recall@100")
# a second Korean set of another style, to see that a gain on KorQuAD is not a loss elsewhere: koret's own
# synthetic questions about fictional entities (samples/ko-synth: 150 held-out questions, 450 passages)
OOD = {"path": "samples/ko-synth/eval.jsonl", "corpus": "samples/ko-synth/train.jsonl", "corpus_column": "positive"}


@dataclass(frozen=True)
class Arm:
    """One row of the study: which mined candidates, which filter, which training overrides."""

    name: str
    what: str
    mine: str = "dense"  # dense | lexical
    filter: dict[str, Any] = field(default_factory=lambda: {"strategy": "perc_pos", "perc": 0.95})
    negatives: int = 3
    train: dict[str, Any] = field(default_factory=dict)


MNRL = {"loss.name": "mnrl"}
GIST = {"loss.name": "gist", "loss.guide": "teacher"}
# in the order they run: the arms the issue asks for first, so a short session still answers the main questions
ARMS = [
    Arm("base", "multilingual-e5-small, no training"),
    Arm("perc_mnrl", "perc_pos 0.95, 3 negatives, MNRL (no guide)", train=MNRL),
    Arm("naive_mnrl", "naive top-k, 3 negatives, MNRL", filter={"strategy": "naive"}, train=MNRL),
    Arm("perc_mnrl_lexical", "perc_mnrl + Korean BM25 candidates", mine="lexical", train=MNRL),
    Arm("perc_mnrl_distill", "perc_mnrl + KL distillation of the teacher scores (weight 1)",
        train={**MNRL, "loss.distill": {"name": "kl", "weight": 1.0}}),
    Arm("perc_gist", "perc_pos 0.95, 3 negatives, GIST (guide = teacher = student's start)", train=GIST),
    Arm("margin_mnrl", "margin_pos 0.05, 3 negatives, MNRL", filter={"strategy": "margin_pos", "margin": 0.05},
        train=MNRL),
    Arm("perc_mnrl_1neg", "perc_pos 0.95, 1 negative, MNRL", negatives=1, train=MNRL),
    Arm("perc_mnrl_7neg", "perc_pos 0.95, 7 negatives, MNRL", negatives=7, train=MNRL),
]
# pairs compared directly (the question each answers)
PAIRS = [("perc_mnrl", "naive_mnrl", "positive-aware filter vs naive top-k"),
         ("perc_mnrl", "margin_mnrl", "perc_pos vs margin_pos"),
         ("perc_gist", "perc_mnrl", "the guide's worth (GIST vs MNRL)"),
         ("perc_mnrl_lexical", "perc_mnrl", "+ lexical candidates"),
         ("perc_mnrl_distill", "perc_mnrl", "+ distillation"),
         ("perc_mnrl_7neg", "perc_mnrl", "7 vs 3 negatives"),
         ("perc_mnrl", "perc_mnrl_1neg", "3 vs 1 negative")]


# --------------------------------------------------------------------------------------------- running koret


def koret(*args: str, log: Path) -> float:
    """Run one koret command, its output appended to ``log``; returns its wall seconds; raises on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "KORET_LOG_INTERVAL": os.environ.get("KORET_LOG_INTERVAL", "60")}
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ koret {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", "koret", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"quality: koret {args[0]} failed (exit {proc.returncode}); see {log}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def sets(overrides: dict[str, Any]) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, dict | list) else value}"]
    return out


def e5_model() -> str:
    python = sys.executable
    proc = subprocess.run([str(E5_BUILDER), "", python], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------- the phases


def mine(kind: str, e5: str, work: Path, opts: argparse.Namespace) -> Path:
    """Mine articles 0-111 once per candidate source (negatives 7 and top_k 50: every filter arm re-filters)."""
    out = work / f"mine-{kind}"
    if (out / "candidates.parquet").exists() and (out / "stats.json").exists():
        return out
    extra = {"search.lexical": {"method": "bm25", "tokenizer": "kiwi", "top_k": 50}} if kind == "lexical" else {}
    koret("mine", "-c", "configs/mine.yaml", "--set", f"data.train={DATA}#{TRAIN_ARTICLES}", "--set", "data.corpus=null",
          "--set", f"teacher.model={e5}", "--set", f"teacher.max_seq_length={opts.mine_max_seq_length}",
          "--set", "search.top_k=50", "--set", "filter.num_negatives=7", "--set", f"output.dir={out}",
          "--set", f"cache_dir={work / 'cache'}", *sets(extra), log=work / "logs" / f"mine-{kind}.log")
    return out


def filtered(arm: Arm, mined: Path, work: Path) -> Path:
    """``koret filter`` of the mined candidates with the arm's strategy and number of negatives."""
    key = "-".join([arm.mine, *(f"{k}{v}" for k, v in sorted(arm.filter.items())), f"n{arm.negatives}"])
    out = work / f"filter-{key}"
    if (out / "train.parquet").exists():
        return out
    koret("filter", "-c", str(mined / "config.yaml"), "--set", f"filter.candidates={mined}",
          "--set", f"output.dir={out}", "--set", f"filter.num_negatives={arm.negatives}",
          *sets({f"filter.{k}": v for k, v in arm.filter.items()}), log=work / "logs" / f"filter-{key}.log")
    return out


def train(arm: Arm, data: Path, e5: str, work: Path, opts: argparse.Namespace) -> tuple[Path, float]:
    out = work / arm.name / "train"
    if (out / "final" / "modules.json").exists():
        return out / "final", 0.0
    rows = opts.steps * opts.batch
    seconds = koret(
        "train", "-c", "configs/train.yaml", "--resume", "--set", f"model.name={e5}",
        "--set", f"model.max_seq_length={opts.max_seq_length}", "--set", f"data.train={data / 'train.parquet'}",
        "--set", f"data.limit={rows}",
        *(["--set", f"loss.temperature={opts.temperature}"] if opts.temperature else []),
        "--set", f"args.output_dir={out}", "--set", f"args.per_device_train_batch_size={opts.batch}",
        "--set", f"args.learning_rate={opts.lr}", "--set", "args.logging_steps=5",
        "--set", "args.save_steps=10", "--set", "args.save_total_limit=1", "--set", "args.seed=42",
        *sets(arm.train), log=work / "logs" / f"{arm.name}.log")
    return out / "final", seconds


def evaluate(arm: Arm, model: str, e5: str, work: Path, opts: argparse.Namespace,
             ood: bool = False) -> tuple[Path, float]:
    """The arm's model and the untrained one on articles 112-139 (``ood``: on ko-synth), in one ``koret eval``
    (paired comparison)."""
    out = work / arm.name / ("eval-ood" if ood else "eval")
    if (out / "metrics.json").exists():
        return out, 0.0
    models = [{"name": e5, "label": "base", "max_seq_length": opts.eval_max_seq_length}]
    if arm.name != "base":
        models.append({"name": model, "label": arm.name, "max_seq_length": opts.eval_max_seq_length})
    data = {k: str(REPO / v) if k != "corpus_column" else v for k, v in OOD.items()} if ood else \
        {"path": f"{DATA}#{EVAL_ARTICLES}"}
    cfg = {"data": data, "models": models, "k": [1, 3, 5, 10, 100], "output": {"dir": str(out)},
           "cache_dir": str(work / "cache")}
    path = work / arm.name / ("eval-ood.json" if ood else "eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))  # YAML 1.2 reads JSON
    return out, koret("eval", "-c", str(path), log=work / "logs" / f"{arm.name}.log")


# --------------------------------------------------------------------------------------------- results


def ood_result(arm: Arm, work: Path) -> dict[str, Any]:
    metrics = json.loads((work / arm.name / "eval-ood" / "metrics.json").read_text())
    row = metrics["models"][-1]
    out: dict[str, Any] = {"data": OOD["path"], "queries": metrics["data"]["queries"],
                           "passages": metrics["data"]["passages"], "ndcg@10": row["metrics"]["ndcg@10"]}
    if arm.name != "base":
        out["vs_base"] = row["significance"]["metrics"]["ndcg@10"]
    return out


def arm_result(arm: Arm, work: Path, seconds: dict[str, float]) -> dict[str, Any]:
    metrics = json.loads((work / arm.name / "eval" / "metrics.json").read_text())
    row = metrics["models"][-1]
    out: dict[str, Any] = {"arm": arm.name, "what": arm.what, "metrics": {k: row["metrics"][k] for k in HEADLINE},
                           "queries": metrics["data"]["queries"], "passages": metrics["data"]["passages"]}
    if arm.name != "base":
        out["vs_base"] = {k: row["significance"]["metrics"][k] for k in HEADLINE}
        tm = json.loads((work / arm.name / "train" / "metrics.json").read_text())
        out["train"] = {"steps": tm["steps"], "rows": tm["train_rows"], "final_loss": tm["final_loss"],
                        "seconds": tm["wall_seconds"], "tokens_per_second": tm.get("tokens_per_second"),
                        "peak_rss_bytes": tm.get("peak_rss_bytes")}
        out["seconds"] = seconds
    return out


def per_query_ndcg(work: Path, arm: str) -> list[float]:
    """NDCG@10 per query of an arm, recomputed from its eval's per_query.jsonl (the top 10 and the qrels)."""
    from koret.metrics import query_metrics

    rows = (work / arm / "eval" / "per_query.jsonl").read_text().splitlines()
    out = []
    for line in rows:
        r = json.loads(line)
        top = [d for d, _ in r["models"][arm]["top10"]]
        out.append(query_metrics(top, r["relevant"], [10])["ndcg@10"])
    return out


def compare_pairs(work: Path, done: set[str]) -> list[dict[str, Any]]:
    from koret.significance import paired_comparison

    out = []
    for a, b, question in PAIRS:
        if a in done and b in done:
            c = paired_comparison(per_query_ndcg(work, b), per_query_ndcg(work, a))
            out.append({"a": a, "b": b, "question": question, "ndcg@10": c.as_dict()})
    return out


def markdown(results: list[dict[str, Any]], pairs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from koret.evaluate import format_p

    lines = [f"Quality study, {meta['date']}, {meta['machine']}: `{meta['command']}`. Model multilingual-e5-small "
             f"(teacher, student{', guide' if any(r['arm'] == 'perc_gist' for r in results) else ''}); "
             f"train on KorQuAD 1.0 dev articles 0-111, evaluate on articles 112-139 "
             f"({results[0]['queries']:,} questions, {results[0]['passages']:,} passages). Each trained arm: "
             f"{meta['steps']} steps x batch {meta['batch']} ({meta['steps'] * meta['batch']} rows), lr {meta['lr']}, "
             f"temperature {meta['temperature'] or 'of each loss (MNRL 0.05, GIST 0.01)'}, "
             f"{meta['max_seq_length']} tokens in training, "
             f"{meta['eval_max_seq_length']} in eval. Deltas vs base with the paired-bootstrap 95% CI; p: paired "
             f"randomization test. Last columns: the same models on a Korean set of another style, koret's "
             f"synthetic questions about fictional entities (`{OOD['path']}`, "
             f"{next((r['ood']['queries'] for r in results if 'ood' in r), 0)} questions).", "",
             "| arm | what | NDCG@10 | Δ NDCG@10 [95% CI] | p | MRR@10 | R@10 | R@100 | steps | train s "
             "| ko-synth NDCG@10 | Δ [95% CI] |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        m = r["metrics"]
        if "vs_base" in r:
            s = r["vs_base"]["ndcg@10"]
            delta = f"{s['delta'] * 100:+.2f} [{s['ci_low'] * 100:+.2f}, {s['ci_high'] * 100:+.2f}]"
            p, steps, secs = format_p(s["p_value"]), str(r["train"]["steps"]), f"{r['train']['seconds']:.0f}"
        else:
            delta, p, steps, secs = "", "", "", ""
        ood, ood_delta = "", ""
        if "ood" in r:
            ood = f"{r['ood']['ndcg@10'] * 100:.2f}"
            if "vs_base" in r["ood"]:
                o = r["ood"]["vs_base"]
                ood_delta = f"{o['delta'] * 100:+.2f} [{o['ci_low'] * 100:+.2f}, {o['ci_high'] * 100:+.2f}]"
        lines.append(f"| {r['arm']} | {r['what']} | {m['ndcg@10'] * 100:.2f} | {delta} | {p} | "
                     f"{m['mrr@10'] * 100:.2f} | {m['recall@10'] * 100:.2f} | {m['recall@100'] * 100:.2f} | "
                     f"{steps} | {secs} | {ood} | {ood_delta} |")
    if pairs:
        lines += ["", "| comparison | question | Δ NDCG@10 [95% CI] | p |", "| --- | --- | ---: | ---: |"]
        for c in pairs:
            s = c["ndcg@10"]
            lines.append(f"| {c['a']} vs {c['b']} | {c['question']} | {s['delta'] * 100:+.2f} "
                         f"[{s['ci_low'] * 100:+.2f}, {s['ci_high'] * 100:+.2f}] | {format_p(s['p_value'])} |")
    lines.append("")
    lines.append("Metrics in points (x100). Arms not listed did not run yet (the script resumes).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(a.name for a in ARMS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5, help="koret's default")
    p.add_argument("--temperature", type=float, default=0.01,
                   help="e5's own training temperature (MNRL's default 0.05 lost 5 points here, see docs/quality.md)")
    p.add_argument("--max-seq-length", type=int, default=256, help="as in eval (128 lost points: KorQuAD answers "
                                                                     "often lie past the first 128 tokens)")
    p.add_argument("--mine-max-seq-length", type=int, default=256)
    p.add_argument("--eval-max-seq-length", type=int, default=256)
    p.add_argument("--work", default=str(REPO / "runs" / "quality"))
    opts = p.parse_args()
    if not DATA.exists():
        raise SystemExit(f"quality: {DATA} not found (KorQuAD 1.0 dev, in this project's shared/data; "
                         "KORET_SHARED=path/to/shared if it is not beside the clone)")
    work = Path(opts.work)
    wanted = opts.arms.split(",")
    unknown = set(wanted) - {a.name for a in ARMS}
    if unknown:
        raise SystemExit(f"quality: unknown arms {sorted(unknown)}; known: {[a.name for a in ARMS]}")
    e5 = e5_model()
    started = time.perf_counter()
    done: list[dict[str, Any]] = []
    for arm in [a for a in ARMS if a.name in wanted]:
        result_path = work / arm.name / "result.json"
        if result_path.exists():
            result = json.loads(result_path.read_text())
            if "ood" not in result:  # an arm finished before the out-of-domain check existed
                model = e5 if arm.name == "base" else str(work / arm.name / "train" / "final")
                evaluate(arm, model, e5, work, opts, ood=True)
                result["ood"] = ood_result(arm, work)
                result_path.write_text(json.dumps(result, indent=2))
            done.append(result)
            print(f"quality: {arm.name} done before, skipped", flush=True)
            continue
        print(f"quality: {arm.name}: {arm.what}", flush=True)
        seconds: dict[str, float] = {}
        model = e5
        if arm.name != "base":
            mined = mine(arm.mine, e5, work, opts)
            data = filtered(arm, mined, work)
            model_path, seconds["train"] = train(arm, data, e5, work, opts)
            model = str(model_path)
        _, seconds["eval"] = evaluate(arm, model, e5, work, opts)
        evaluate(arm, model, e5, work, opts, ood=True)
        result = {**arm_result(arm, work, seconds), "ood": ood_result(arm, work)}
        result_path.write_text(json.dumps(result, indent=2))
        done.append(result)
        print(f"quality: {arm.name}: NDCG@10 {result['metrics']['ndcg@10']:.4f}", flush=True)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
            "command": "make quality", "steps": opts.steps, "batch": opts.batch, "lr": opts.lr,
            "temperature": opts.temperature, "max_seq_length": opts.max_seq_length,
            "eval_max_seq_length": opts.eval_max_seq_length, "seconds_this_run": time.perf_counter() - started}
    pairs = compare_pairs(work, {r["arm"] for r in done})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps({"meta": meta, "arms": done, "pairs": pairs}, indent=2))
    table_md = markdown(done, pairs, meta)
    (RESULTS / "quality.md").write_text(table_md)
    update_doc("docs/quality.md", "quality", table_md)
    print(table_md)


if __name__ == "__main__":
    main()
