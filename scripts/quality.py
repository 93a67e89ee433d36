"""The quality study (``make quality``): koret's recipe options on a model that already reads Korean.

Model: multilingual-e5-small (``../shared/tools/make-e5-small.sh``) as teacher, guide and student, with its own
prompts. Data: KorQuAD 1.0 dev split by article: mine and train on articles 0-111, evaluate on 112-139 (1,458
questions over their passages). Every arm is a run of koret's own commands (``koret mine``, ``koret filter``,
``koret train``, ``koret eval``) with the same seed, the same number of training rows and steps; each is
compared with the untrained model on the same queries (paired bootstrap 95% CI of the gain and a paired
randomization p-value, :mod:`koret.significance`), and a few arms with each other. Every model is evaluated on a
suite of two Korean sets in one ``koret eval``: KorQuAD articles 112-139 and koret's synthetic ko-synth, per set
and their macro average (the average's interval resamples queries within each set). Training rows are a seeded
sample of the whole training split (``data.sample``), except in the arm that measures first-N rows.

Sized for this project's 2-core CPU machine (about 20 minutes an arm; ``--steps``, ``--batch``,
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
EVAL_SET, OOD_SET, AVERAGE = "korquad-112-139", "ko-synth", "average"  # the suite's set names, and the average's
# the options an arm's figures depend on (bench/results/quality.json's meta): arms of an earlier run are kept only
# where they are the same
SETTINGS = ("steps", "batch", "lr", "temperature", "max_seq_length", "eval_max_seq_length")


@dataclass(frozen=True)
class Arm:
    """One row of the study: which mined candidates, which filter, which training overrides."""

    name: str
    what: str
    mine: str = "dense"  # dense | lexical
    filter: dict[str, Any] = field(default_factory=lambda: {"strategy": "perc_pos", "perc": 0.95})
    negatives: int = 3
    train: dict[str, Any] = field(default_factory=dict)
    rows: str = "sample"  # sample: data.sample of the whole split (seeded) | first: data.limit, the first N rows
    rounds: int = 1  # 2: mine again with the round-1 model as teacher, filter alike, train again
    round_start: str = "trained"  # round 2 trains on from round 1's model (trained) or from e5 itself (base)
    # the arm whose trained model is round 1 (its recipe, rows and seed are this arm's own, so its model is what
    # round 1 would train): both 2-round arms share one round 1 and one re-mining, and "2 rounds vs 1" compares
    # round 2 with the very model it started from
    round1: str = ""


MNRL = {"loss.name": "mnrl"}
GIST = {"loss.name": "gist", "loss.guide": "teacher"}
NAIVE = {"strategy": "naive"}
PERC = {"strategy": "perc_pos", "perc": 0.95}
CALIB = {"strategy": "perc_pos", "perc": 0.75, "scale": "calibrated"}  # 0.75: the planted benchmark's best balance
# koret's shipped filter default (FilterConfig's defaults; tests/test_scripts.py checks that they agree), the
# filter of the arm marked "default" in quality.json: naive top-k without near-copies of the positive
DEFAULT_FILTER = {"strategy": "naive", "max_overlap": 0.9}
DEFAULT_ARM = "naive_guard_mnrl"
# an arm's filter settings where it names none (koret's defaults before 2026-12-02: no guard, raw scores)
UNSET_FILTER = {"max_overlap": None, "scale": "raw"}
# in the order they run: the arms the open questions need first, so a short session still answers them
ARMS = [
    Arm("base", "multilingual-e5-small, no training"),
    Arm("naive_mnrl", "naive top-k, 3 negatives, MNRL", filter=NAIVE, train=MNRL),
    Arm("calib_mnrl", "perc_pos 0.75 on the calibrated scale, 3 negatives, MNRL", filter=CALIB, train=MNRL),
    Arm("perc_mnrl", "perc_pos 0.95 (raw scores), 3 negatives, MNRL", filter=PERC, train=MNRL),
    Arm(DEFAULT_ARM, "naive top-k without near-copies of the positive (max_overlap 0.9), 3 negatives, MNRL",
        filter=DEFAULT_FILTER, train=MNRL),
    Arm("default_first", "the default's recipe on the first N rows (data.limit) instead of a sample",
        filter=DEFAULT_FILTER, train=MNRL, rows="first"),
    Arm("default_rounds2", "round 1 = the default arm's model; re-mined with it as teacher, the default filter, "
        "trained on from it (2 rounds)", filter=DEFAULT_FILTER, train=MNRL, rounds=2, round1=DEFAULT_ARM),
    Arm("default_rounds2_base", "as default_rounds2, but round 2 trains e5 itself on the round-1 model's negatives",
        filter=DEFAULT_FILTER, train=MNRL, rounds=2, round_start="base", round1=DEFAULT_ARM),
    Arm("perc_mnrl_lexical", "perc_mnrl + Korean BM25 candidates", mine="lexical", train=MNRL),
    Arm("perc_mnrl_distill", "perc_mnrl + KL distillation of the teacher scores (weight 1)",
        train={**MNRL, "loss.distill": {"name": "kl", "weight": 1.0}}),
    Arm("perc_gist", "perc_pos 0.95, 3 negatives, GIST (guide = teacher = student's start)", train=GIST),
    Arm("margin_mnrl", "margin_pos 0.05, 3 negatives, MNRL", filter={"strategy": "margin_pos", "margin": 0.05},
        train=MNRL),
    Arm("perc_mnrl_1neg", "perc_pos 0.95, 1 negative, MNRL", negatives=1, train=MNRL),
    Arm("perc_mnrl_7neg", "perc_pos 0.95, 7 negatives, MNRL", negatives=7, train=MNRL),
]
# pairs compared directly (the question each answers), on each set and on the average
PAIRS = [(DEFAULT_ARM, "naive_mnrl", "the default vs naive top-k"),
         (DEFAULT_ARM, "perc_mnrl", "the default vs perc_pos 0.95 on raw scores (the default before)"),
         (DEFAULT_ARM, "calib_mnrl", "the default vs perc_pos 0.75 on calibrated scores"),
         ("calib_mnrl", "perc_mnrl", "perc_pos on calibrated vs raw scores"),
         (DEFAULT_ARM, "default_first", "rows sampled from the whole split vs the first N"),
         ("default_rounds2", DEFAULT_ARM, "2 rounds vs 1"),
         ("default_rounds2", "default_rounds2_base", "round 2 from the round-1 model vs from the base"),
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
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, dict | list) or value is None else value}"]
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


def filtered(arm: Arm, mined: Path, work: Path, tag: str | None = None) -> Path:
    """``koret filter`` of the mined candidates with the arm's strategy and number of negatives (``tag``: of
    candidates other than the shared first mining's)."""
    key = "-".join([tag or arm.mine, *(f"{k}{v}" for k, v in sorted(arm.filter.items())), f"n{arm.negatives}"])
    # what the arm does not set is set here, not inherited from the mined config.yaml (whose filter section is
    # configs/mine.yaml's of the day it was mined: since 2026-12-02 max_overlap 0.9, which would turn "naive
    # top-k" into the default and "perc_pos 0.95" into perc_pos with the guard)
    rule = {**UNSET_FILTER, **arm.filter}
    out = work / f"filter-{key}"
    if (out / "train.parquet").exists():
        return out
    koret("filter", "-c", str(mined / "config.yaml"), "--set", f"filter.candidates={mined}",
          "--set", f"output.dir={out}", "--set", f"filter.num_negatives={arm.negatives}",
          *sets({f"filter.{k}": v for k, v in rule.items()}), log=work / "logs" / f"filter-{key}.log")
    return out


def train(arm: Arm, data: Path, start: str, work: Path, opts: argparse.Namespace, out: Path) -> float:
    """``koret train`` of ``start`` on the arm's filtered rows (the same number of rows and steps in every arm)."""
    if (out / "final" / "modules.json").exists():
        return 0.0
    rows = opts.steps * opts.batch
    pick = ["--set", f"data.limit={rows}"] if arm.rows == "first" else \
        ["--set", f"data.sample={rows}", "--set", "data.sample_seed=42"]
    return koret(
        "train", "-c", "configs/train.yaml", "--resume", "--set", f"model.name={start}",
        "--set", f"model.max_seq_length={opts.max_seq_length}", "--set", f"data.train={data / 'train.parquet'}",
        "--set", "model.attention_dropout=null",  # the arms ran with the model's own dropout (as a GPU run does)
        *pick, *(["--set", f"loss.temperature={opts.temperature}"] if opts.temperature else []),
        "--set", f"args.output_dir={out}", "--set", f"args.per_device_train_batch_size={opts.batch}",
        "--set", f"args.learning_rate={opts.lr}", "--set", "args.logging_steps=5",
        "--set", "args.save_steps=10", "--set", "args.save_total_limit=1", "--set", "args.seed=42",
        *sets(arm.train), log=work / "logs" / f"{arm.name}.log")


def remine(arm: Arm, teacher: str, work: Path, opts: argparse.Namespace) -> Path:
    """Round 2's candidates: articles 0-111 mined again with the round-1 model (``arm.round1``'s) as teacher."""
    out = work / f"mine-round2-{arm.round1}"
    if (out / "candidates.parquet").exists() and (out / "stats.json").exists():
        return out
    koret("mine", "-c", "configs/mine.yaml", "--set", f"data.train={DATA}#{TRAIN_ARTICLES}", "--set", "data.corpus=null",
          "--set", f"teacher.model={teacher}", "--set", f"teacher.max_seq_length={opts.mine_max_seq_length}",
          "--set", "search.top_k=50", "--set", "filter.num_negatives=7", "--set", f"output.dir={out}",
          "--set", f"cache_dir={work / 'cache'}", log=work / "logs" / f"mine-round2-{arm.round1}.log")
    return out


def suite_sets() -> list[dict[str, Any]]:
    """The study's test suite: KorQuAD's held-out articles and ko-synth."""
    return [{"name": EVAL_SET, "path": f"{DATA}#{EVAL_ARTICLES}"},
            {"name": OOD_SET, **{k: str(REPO / v) if k != "corpus_column" else v for k, v in OOD.items()}}]


def evaluate(arm: Arm, model: str, e5: str, work: Path, opts: argparse.Namespace) -> float:
    """The arm's model and the untrained one on the suite, in one ``koret eval`` (paired comparison)."""
    out = work / arm.name / "eval-suite"
    if (out / "metrics.json").exists():
        return 0.0
    models = [{"name": e5, "label": "base", "max_seq_length": opts.eval_max_seq_length}]
    if arm.name != "base":
        models.append({"name": model, "label": arm.name, "max_seq_length": opts.eval_max_seq_length})
    cfg = {"sets": suite_sets(), "models": models, "k": [1, 3, 5, 10, 100], "output": {"dir": str(out)},
           "cache_dir": str(work / "cache")}
    path = work / arm.name / "eval-suite.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))  # YAML 1.2 reads JSON
    return koret("eval", "-c", str(path), log=work / "logs" / f"{arm.name}.log")


# --------------------------------------------------------------------------------------------- results


def _row(record: dict[str, Any], arm: Arm) -> dict[str, Any]:
    row = record["models"][-1]
    out: dict[str, Any] = {"metrics": {k: row["metrics"][k] for k in HEADLINE if k in row["metrics"]},
                           "queries": record["data"]["queries"], "passages": record["data"]["passages"]}
    if arm.name != "base":
        out["vs_base"] = {k: row["significance"]["metrics"][k] for k in out["metrics"]}
    return out


def arm_result(arm: Arm, work: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """An arm's metrics on each set and on their macro average, each with its gain over base."""
    metrics = json.loads((work / arm.name / "eval-suite" / "metrics.json").read_text())
    out: dict[str, Any] = {"arm": arm.name, "what": arm.what, "default": arm.name == DEFAULT_ARM,
                           "sets": {name: _row(rec, arm) for name, rec in metrics["sets"].items()},
                           AVERAGE: _row(metrics, arm)}
    # NDCG@10 of every query, in the eval's order: the paired comparisons need them, and bench/results keeps
    # them, so a later session can compare a new arm with one whose run folder is gone
    out["per_query_ndcg@10"] = per_query_ndcg(work, arm.name)
    if arm.name != "base":
        final = work / arm.name / ("train-round2" if arm.rounds == 2 else "train")
        tm = json.loads((final / "metrics.json").read_text())
        out["train"] = {"steps": tm["steps"], "rows": tm["train_rows"], "final_loss": tm["final_loss"],
                        "seconds": tm["wall_seconds"], "tokens_per_second": tm.get("tokens_per_second"),
                        "peak_rss_bytes": tm.get("peak_rss_bytes"), "rounds": arm.rounds, "rows_from": arm.rows}
        if arm.rounds == 2:
            first = json.loads((work / arm.round1 / "train" / "metrics.json").read_text())
            out["train"]["steps"] += first["steps"]
            out["train"]["seconds"] += first["wall_seconds"]
        out["seconds"] = seconds
    return out


def per_query_ndcg(work: Path, arm: str) -> dict[str, list[float]]:
    """NDCG@10 per query of an arm on each set, recomputed from its eval's per_query.jsonl (top 10 and qrels)."""
    from koret.metrics import query_metrics

    out: dict[str, list[float]] = {}
    for line in (work / arm / "eval-suite" / "per_query.jsonl").read_text().splitlines():
        r = json.loads(line)
        top = [d for d, _ in r["models"][arm]["top10"]]
        out.setdefault(r["set"], []).append(query_metrics(top, r["relevant"], [10])["ndcg@10"])
    return out


def compare_pairs(done: dict[str, dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair's NDCG@10 delta (a - b) on every set and on the macro average, with CI and p-value, from the
    arms' per-query values; a pair of arms measured before they were kept is taken from ``before`` (the last
    quality.json), as it was computed then."""
    from koret.significance import macro_paired_comparison, paired_comparison

    out = []
    earlier = {(c["a"], c["b"]): c for c in before}
    for a, b, question in PAIRS:
        if a not in done or b not in done:
            continue
        pa, pb = _kept_values(a, done[a]), _kept_values(b, done[b])
        if pa is None or pb is None:
            if (a, b) in earlier and _describes(earlier[(a, b)], done[a], done[b]):
                out.append(earlier[(a, b)])
            elif (a, b) in earlier:
                print(f"quality: {a} − {b} of {earlier[(a, b)].get('date')} left out: one of the two was measured "
                      f"again since; run the other again to compare them", flush=True)
            continue
        names = list(pa)
        if set(pa) != set(pb) or any(len(pa[n]) != len(pb[n]) for n in names):
            raise SystemExit(f"quality: {a} and {b} were evaluated on different queries; rerun one of them")
        row: dict[str, Any] = {"a": a, "b": b, "question": question,
                               "date": max(done[a]["date"], done[b]["date"]),
                               "sets": {n: {"ndcg@10": paired_comparison(pb[n], pa[n]).as_dict()} for n in names}}
        row[AVERAGE] = {"ndcg@10": macro_paired_comparison([pb[n] for n in names],
                                                           [pa[n] for n in names]).as_dict()}
        out.append(row)
    return out


def _kept_values(name: str, arm: dict[str, Any]) -> dict[str, list[float]] | None:
    """An arm's per-query NDCG@10 (None where it has none), checked against its own figures: as many values as
    queries on each set, averaging to its NDCG@10; a list that does not add up (quality.json edited, another
    eval's result.json) stops the study rather than pair the wrong queries."""
    values = arm.get("per_query_ndcg@10")
    if values is None:
        return None
    for n, block in arm["sets"].items():
        got = values.get(n) or []
        if len(got) != block["queries"] or abs(sum(got) / max(len(got), 1) - block["metrics"]["ndcg@10"]) > 1e-9:
            raise SystemExit(f"quality: {name}'s per-query NDCG@10 on {n} does not add up to its NDCG@10 over "
                             f"{block['queries']} queries (its result.json or bench/results/quality.json edited?); "
                             f"rerun {name}")
    return values


def _describes(pair: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> bool:
    """An earlier run's pair still describes arms ``a`` and ``b`` as they are now: on every set and the average its
    Δ is a's gain over base minus b's (the same queries and base), so neither was measured again since."""
    blocks = [(pair.get("sets", {}).get(n), a["sets"][n], b["sets"].get(n)) for n in a["sets"]]
    blocks.append((pair.get(AVERAGE), a[AVERAGE], b[AVERAGE]))
    try:
        return all(abs(got["ndcg@10"]["delta"] - (x["vs_base"]["ndcg@10"]["delta"] - y["vs_base"]["ndcg@10"]["delta"]))
                   < 1e-9 for got, x, y in blocks)
    except (KeyError, TypeError):  # a set or figure one of them lacks
        return False


def _ci(s: dict[str, Any]) -> str:
    return f"{s['delta'] * 100:+.2f} [{s['ci_low'] * 100:+.2f}, {s['ci_high'] * 100:+.2f}]"


def markdown(results: list[dict[str, Any]], pairs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from koret.evaluate import format_p

    first = results[0]["sets"]
    lines = [f"Quality study, {meta['date']}, {meta['machine']}: `{meta['command']}`. Model multilingual-e5-small "
             f"(teacher, student{', guide' if any(r['arm'] == 'perc_gist' for r in results) else ''}); "
             f"train on KorQuAD 1.0 dev articles 0-111, a seeded sample of {meta['steps'] * meta['batch']} rows "
             f"(`data.sample`; first-N rows where an arm says so); each trained arm {meta['steps']} steps x batch "
             f"{meta['batch']}, lr {meta['lr']}, temperature "
             f"{meta['temperature'] or 'of each loss (MNRL 0.05, GIST 0.01)'}, {meta['max_seq_length']} tokens in "
             f"training, {meta['eval_max_seq_length']} in eval. Test suite: `{EVAL_SET}` (KorQuAD articles 112-139, "
             f"{first[EVAL_SET]['queries']:,} questions, {first[EVAL_SET]['passages']:,} passages) and `{OOD_SET}` "
             f"(koret's synthetic questions about fictional entities, {first[OOD_SET]['queries']:,} questions, "
             f"{first[OOD_SET]['passages']:,} passages); `average`: their macro average (every set counts alike). "
             f"Δ: NDCG@10 gain over base (the untrained model) on the same queries, with the paired-bootstrap 95% "
             f"CI (for the average: queries resampled within each set); p: paired randomization test. "
             f"**default** marks koret's shipped filter.", "",
             f"| arm | what | {EVAL_SET} NDCG@10 | Δ vs base [95% CI] | p | {OOD_SET} NDCG@10 | Δ vs base [95% CI] "
             f"| average NDCG@10 | Δ vs base [95% CI] | p | steps | train s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        cells = []
        for block, with_p in ((r["sets"][EVAL_SET], True), (r["sets"][OOD_SET], False), (r[AVERAGE], True)):
            cells.append(f"{block['metrics']['ndcg@10'] * 100:.2f}")
            s = block.get("vs_base", {}).get("ndcg@10")
            cells.append(_ci(s) if s else "")
            if with_p:
                cells.append(format_p(s["p_value"]) if s else "")
        train = r.get("train")
        steps, secs = (str(train["steps"]), f"{train['seconds']:.0f}") if train else ("", "")  # see the note below
        name = f"**{r['arm']}** (default)" if r.get("default") else r["arm"]
        lines.append(f"| {name} | {r['what']} | {' | '.join(cells)} | {steps} | {secs} |")
    if pairs:
        lines += ["", f"| comparison | question | {EVAL_SET} Δ NDCG@10 [95% CI] | p | {OOD_SET} Δ [95% CI] | "
                      "average Δ [95% CI] | p |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in pairs:
            k, o, avg = c["sets"][EVAL_SET]["ndcg@10"], c["sets"][OOD_SET]["ndcg@10"], c[AVERAGE]["ndcg@10"]
            lines.append(f"| {c['a']} − {c['b']} | {c['question']} | {_ci(k)} | {format_p(k['p_value'])} | {_ci(o)} "
                         f"| {_ci(avg)} | {format_p(avg['p_value'])} |")
    lines.append("")
    lines.append("Metrics in points (x100); a comparison's Δ is its first arm minus its second. train s: wall seconds "
                 "of the training process that finished the arm (a training resumed from a checkpoint counts only its "
                 "last part); for a 2-round arm, steps and train s are both rounds' together (its round 1 is the arm its "
                 "what names). Arms not listed did not run yet (the script resumes).")
    older = [f"{r['arm']} ({r['date']})" for r in results if r.get("date", meta["date"]) != meta["date"]] + \
        [f"{c['a']} − {c['b']} ({c['date']})" for c in pairs if c.get("date", meta["date"]) != meta["date"]]
    if older:
        lines.append(f"Measured on {meta['date']} except, kept from an earlier run (same settings and code of "
                     f"the study): {', '.join(older)}.")
    return "\n".join(lines) + "\n"


def run_arm(arm: Arm, e5: str, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Mine (shared), filter, train (twice for 2 rounds) and evaluate one arm; returns its result."""
    seconds: dict[str, float] = {}
    model = e5
    if arm.name != "base":
        data = filtered(arm, mine(arm.mine, e5, work, opts), work)
        first = work / (arm.round1 or arm.name) / "train"  # a 2-round arm's round 1 is its round1 arm's training
        seconds["train"] = train(arm, data, e5, work, opts, first)
        model = str(first / "final")
        if arm.rounds == 2:
            t0 = time.perf_counter()
            data2 = filtered(arm, remine(arm, model, work, opts), work, tag=f"{arm.round1}-round2")
            seconds["mine_round2"] = time.perf_counter() - t0
            start = model if arm.round_start == "trained" else e5
            seconds["train_round2"] = train(arm, data2, start, work, opts, work / arm.name / "train-round2")
            model = str(work / arm.name / "train-round2" / "final")
    seconds["eval"] = evaluate(arm, model, e5, work, opts)
    return arm_result(arm, work, seconds)


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
    # every arm measured at these settings stays in the results: from its run folder, or, where that is gone
    # (runs/ is not kept), as an earlier session measured it, with its date (the last quality.json)
    last = json.loads((RESULTS / "quality.json").read_text()) if (RESULTS / "quality.json").exists() else {}
    other = {k: (last["meta"].get(k), getattr(opts, k)) for k in SETTINGS
             if last and last["meta"].get(k) != getattr(opts, k)}
    if other:  # a table of one size: arms of another are measured again, not kept
        print(f"quality: {RESULTS / 'quality.json'} was measured with other settings "
              f"({', '.join(f'{k} {was} not {now}' for k, (was, now) in other.items())}): its arms are not kept",
              flush=True)
        last = {}
    earlier = {r["arm"]: {"date": last["meta"]["date"], **r} for r in last.get("arms", ())}
    done: list[dict[str, Any]] = []
    for arm in ARMS:
        result_path = work / arm.name / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        if arm.name not in wanted and (result is None or "sets" not in result):
            # not asked for and not in this work folder: as an earlier session measured it, if one did
            if arm.name in earlier:
                done.append({**earlier[arm.name], "default": arm.name == DEFAULT_ARM})
                print(f"quality: {arm.name} kept as measured on {earlier[arm.name]['date']}", flush=True)
            continue
        if result is not None:  # the default mark is today's, not the one of the day the arm ran
            if "sets" not in result:  # the layout of 2026-11-28 (first-N rows, no suite): not comparable
                raise SystemExit(f"quality: {result_path} is a result of the study's older layout (first-N rows, "
                                 f"KorQuAD only); move {work / arm.name} (and its filter-* and mine-* folders, "
                                 f"if mined with older code) aside to run the arm again")
            if "per_query_ndcg@10" not in result:  # written before results kept their queries' values
                result["per_query_ndcg@10"] = per_query_ndcg(work, arm.name)
            done.append({"date": date.fromtimestamp(result_path.stat().st_mtime).isoformat(), **result,
                         "default": arm.name == DEFAULT_ARM})
            print(f"quality: {arm.name} done before, skipped", flush=True)
            continue
        print(f"quality: {arm.name}: {arm.what}", flush=True)
        result = {"date": date.today().isoformat(), **run_arm(arm, e5, work, opts)}
        result_path.write_text(json.dumps(result, indent=2))
        done.append(result)
        print(f"quality: {arm.name}: NDCG@10 {EVAL_SET} {result['sets'][EVAL_SET]['metrics']['ndcg@10']:.4f}, "
              f"average {result[AVERAGE]['metrics']['ndcg@10']:.4f}", flush=True)
    meta = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
            "command": "make quality", "steps": opts.steps, "batch": opts.batch, "lr": opts.lr,
            "temperature": opts.temperature, "max_seq_length": opts.max_seq_length,
            "eval_max_seq_length": opts.eval_max_seq_length, "seconds_this_run": time.perf_counter() - started,
            "default_arm": DEFAULT_ARM, "default_filter": DEFAULT_FILTER, "suite": [EVAL_SET, OOD_SET]}
    pairs = compare_pairs({r["arm"]: r for r in done},
                          [{"date": last["meta"]["date"], **c} for c in last.get("pairs", ())])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps({"meta": meta, "arms": done, "pairs": pairs}, indent=2))
    table_md = markdown(done, pairs, meta)
    (RESULTS / "quality.md").write_text(table_md)
    update_doc("docs/quality.md", "quality", table_md)
    print(table_md)


if __name__ == "__main__":
    main()
