"""``koret push``: upload a trained model to the Hugging Face Hub with a model card that invents nothing.

The card's YAML front matter carries language, library_name, pipeline_tag, tags, license, base_model,
datasets and a ``model-index`` with the evaluation results (so the Hub shows them). Its body has usage with the
right prompts, and the mining, training and evaluation facts read from the files the stages wrote
(``stats.json``, ``metrics.json``, eval's ``metrics.json``); a section whose source file is missing says so.

The token comes from ``HF_TOKEN`` or the login that ``huggingface-cli login`` stored, through
``huggingface_hub.get_token``. It is never printed and never written into any file, log, config or card.
``--dry-run DIR`` writes exactly the folder that would be uploaded and touches no network.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from koret.config import PushConfig
from koret.errors import KoretError
from koret.io import read_record, write_text
from koret.report import info, show, table

CITATIONS = """```bibtex
@article{solatorio2024gistembed,
  title   = {GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
  author  = {Aivin V. Solatorio},
  journal = {arXiv preprint arXiv:2402.16829},
  year    = {2024}
}
@article{moreira2024nvretriever,
  title   = {NV-Retriever: Improving text embedding models with effective hard-negative mining},
  author  = {Gabriel de Souza P. Moreira and Radek Osmulski and Mengyao Xu and Ronay Ak and Benedikt Schifferer
             and Even Oldridge},
  journal = {arXiv preprint arXiv:2407.15831},
  year    = {2024}
}
@inproceedings{reimers2019sentencebert,
  title     = {Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks},
  author    = {Nils Reimers and Iryna Gurevych},
  booktitle = {Proceedings of EMNLP-IJCNLP 2019},
  year      = {2019}
}
```"""

_EVAL_METRICS = [("ndcg@10", "ndcg_at_10", "NDCG@10"), ("mrr@10", "mrr_at_10", "MRR@10"),
                 ("map@10", "map_at_10", "MAP@10"), ("recall@10", "recall_at_10", "Recall@10"),
                 ("precision@10", "precision_at_10", "Precision@10"), ("accuracy@10", "accuracy_at_10", "Accuracy@10"),
                 ("recall@100", "recall_at_100", "Recall@100")]


# --------------------------------------------------------------------------------------------- sources


def gather_sources(cfg: PushConfig) -> dict[str, Any]:
    """Find the train/mine/eval records that describe the model (explicit paths win over derived ones)."""
    model_dir = Path(cfg.model)
    # a LoRA run's adapter is final/adapter, whose run folder is two levels up
    trained = model_dir.parent.parent if model_dir.name == "adapter" and is_adapter(model_dir) else model_dir.parent
    train_dir = Path(cfg.train_dir) if cfg.train_dir else trained
    train_cfg = read_record(train_dir / "config.yaml") or read_record(model_dir / "koret.yaml")
    mine_dir: Path | None = Path(cfg.mine_dir) if cfg.mine_dir else None
    data_cfg = (train_cfg or {}).get("data") or {}
    trained_on = data_cfg.get("train") or next((s.get("train") for s in data_cfg.get("sources") or []
                                                if s.get("train")), None)  # several sources: the first's folder
    if mine_dir is None and trained_on:
        p = Path(trained_on)
        mine_dir = p if p.is_dir() else p.parent
    eval_path = Path(cfg.eval_dir) / "metrics.json" if cfg.eval_dir else None
    return {
        "train_dir": train_dir,
        "train_config": train_cfg,
        "train_metrics": read_record(train_dir / "metrics.json"),
        "mine_dir": mine_dir,
        "mine_stats": read_record(mine_dir / "stats.json") if mine_dir else None,
        "mine_config": read_record(mine_dir / "config.yaml") if mine_dir else None,
        "eval": read_record(eval_path),
    }


def _st_config(model_dir: Path) -> dict[str, Any]:
    return read_record(model_dir / "config_sentence_transformers.json") or {}


def is_reranker(model_dir: Path) -> bool:
    """A CrossEncoder folder (what koret train-reranker writes): sentence-transformers 6 records
    ``model_type: CrossEncoder``; older saves are a sequence-classification model without modules.json."""
    st = read_record(model_dir / "config_sentence_transformers.json") or {}
    if st.get("model_type"):
        return st["model_type"] == "CrossEncoder"
    if (model_dir / "modules.json").exists():
        return False
    archs = (read_record(model_dir / "config.json") or {}).get("architectures") or []
    return any("SequenceClassification" in a for a in archs)


def is_adapter(model_dir: Path) -> bool:
    """A LoRA adapter folder (peft's adapter_config.json): loading it needs peft and the base model."""
    return (model_dir / "adapter_config.json").exists()


def check_model_folder(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise KoretError(f"push.model: model folder not found: {model_dir}", "train first, or set push.model")
    if not (model_dir / "modules.json").exists() and not is_reranker(model_dir):
        raise KoretError(f"push.model: {model_dir} is neither a SentenceTransformer folder (no modules.json) nor a "
                         "CrossEncoder reranker", "push the final/ folder that koret train or train-reranker writes")


# --------------------------------------------------------------------------------------------- card


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _trained_eval_entry(ev: dict[str, Any], model_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(baseline, trained) entries of an eval metrics.json: the trained one is the model being pushed."""
    models = ev.get("models") or []
    if not models:
        return None, None
    target = str(model_dir.resolve())
    trained = next((m for m in models if m.get("model") and Path(m["model"]).resolve().as_posix() == target), None)
    base = models[0] if models[0] is not trained else None
    # not found by path: the last retriever row (a reranked row is matched by its own path, never a fallback)
    return base, trained or next((m for m in reversed(models[1:]) if "reranks" not in m), None)


def _per_set_rows(ev: dict[str, Any], entry: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(dataset name, source, the row of ``entry``'s model) of each test set of an eval record: its one set, or
    each set of a suite (a suite's top-level rows are the macro average, not a data set of the model-index)."""
    if not ev.get("sets"):
        return [(ev["data"]["source"], ev["data"]["source"], entry)]
    return [(set_name, block["data"]["source"], row) for set_name, block in ev["sets"].items()
            for row in block["models"] if row["name"] == entry["name"]]


def build_card(cfg: PushConfig, sources: dict[str, Any]) -> str:
    """The model card (README.md): YAML front matter + body, from recorded facts only."""
    model_dir = Path(cfg.model)
    st_cfg = _st_config(model_dir)
    from koret.prompts import resolve_prompts

    q_prompt, p_prompt = resolve_prompts(st_cfg.get("prompts") or {}, None, "push.model")
    tcfg = sources["train_config"] or {}
    tm = sources["train_metrics"]
    ms = sources["mine_stats"]
    mc = sources["mine_config"] or {}
    ev = sources["eval"]
    base_model = (tcfg.get("model") or {}).get("name")
    rounds = getattr(cfg, "rounds", None) or []  # koret run with run.rounds > 1 (koret.stages.RunPushConfig)
    hub_base = rounds[0]["start"] if rounds else base_model  # a later round may start from round 1's folder
    repo_name = (cfg.repo_id or model_dir.name).split("/")[-1]

    from huggingface_hub import EvalResult, ModelCardData

    reranker = is_reranker(model_dir)
    base_eval, trained_eval = _trained_eval_entry(ev, model_dir) if ev else (None, None)
    if reranker and trained_eval and trained_eval.get("reranks"):  # compare with the retrieval it reorders
        base_eval = next((m for m in ev["models"] if m.get("name") == trained_eval["reranks"]), base_eval)
    eval_results = None
    if trained_eval:
        task = ("text-ranking", "Reranking") if reranker else ("retrieval", "Retrieval")
        eval_results = [EvalResult(task_type=task[0], task_name=task[1], dataset_type=source,
                                   dataset_name=name, dataset_split="test", metric_type=t, metric_name=n,
                                   metric_value=round(float(row["metrics"][k]), 6))
                        for name, source, row in _per_set_rows(ev, trained_eval)
                        for k, t, n in _EVAL_METRICS if k in row["metrics"]]
    datasets = sorted({d for d in ((cfg.datasets or []) + _hub_datasets(tcfg, mc)) if d}) or None
    tags = (["sentence-transformers", "cross-encoder", "reranker", "text-ranking", "korean", "koret"] if reranker
            else ["sentence-transformers", "sentence-similarity", "feature-extraction", "retrieval", "korean", "koret"])
    if tm and tm.get("lora"):
        tags += ["lora", "peft"] if is_adapter(model_dir) else ["lora"]
    card_data = ModelCardData(
        language=["ko"], library_name="sentence-transformers",
        pipeline_tag="text-ranking" if reranker else "sentence-similarity", tags=tags,
        license=cfg.license or "other", datasets=datasets, model_name=repo_name, eval_results=eval_results,
        base_model=hub_base if hub_base and not Path(hub_base).exists() and not hub_base.startswith("pkg:")
        else None,
    )

    body = [f"# {repo_name}", "", describe_recipe(tm, ms), ""]
    if reranker:
        body += ["## Usage", "", "```python", "from sentence_transformers import CrossEncoder", "",
                 f'model = CrossEncoder("{cfg.repo_id or model_dir}")',
                 'query = "한국의 수도는 어디인가?"',
                 'passages = ["서울은 대한민국의 수도이다.", "부산은 대한민국 제2의 도시이다."]',
                 "scores = model.predict([(query, p) for p in passages])",
                 "print(model.rank(query, passages))  # passages reordered, best first", "```", "",
                 "Use it on a retriever's top-k (for example the top 100 of a koret-trained embedding model).", ""]
    else:
        body += _embedding_usage(cfg, model_dir, q_prompt, p_prompt)
    body += _rounds_section(rounds)
    body += _mining_section(ms, mc)
    body += _training_section(tm, tcfg, base_model, reranker, adapter=is_adapter(model_dir))
    body += _evaluation_section(ev, base_eval, trained_eval, reranker)
    body += ["## Citation", "", CITATIONS, ""]
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _embedding_usage(cfg: PushConfig, model_dir: Path, q_prompt: str, p_prompt: str) -> list[str]:
    body = ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f'model = SentenceTransformer("{cfg.repo_id or model_dir}")',
             'queries = ["한국의 수도는 어디인가?"]',
             'passages = ["서울은 대한민국의 수도이다.", "부산은 대한민국 제2의 도시이다."]']
    q_arg = ', prompt_name="query"' if q_prompt else ""
    p_arg = ', prompt_name="document"' if p_prompt else ""
    body += [f"q = model.encode(queries{q_arg})", f"p = model.encode(passages{p_arg})",
             "print(model.similarity(q, p))", "```", ""]
    if q_prompt or p_prompt:
        body += [f"Prompts saved with the model: query `{q_prompt!r}`, passage `{p_prompt!r}`.", ""]
    return body


def _rounds_section(rounds: list[dict[str, str]]) -> list[str]:
    """koret run with run.rounds > 1: what each round mined with and trained from."""
    if len(rounds) < 2:
        return []

    def named(path: str) -> str:
        made = [i for i, r in enumerate(rounds, 1) if r["model"] == path]
        return f"round {made[0]}'s model (`{path}`)" if made else f"`{path}`"

    return ["## Rounds", "", f"{len(rounds)} rounds of mining and training (koret run, `run.rounds: {len(rounds)}`): "
            "each round after the first mined again with the model the round before trained, filtered by the same "
            "rule and trained again. The mining and training facts below are the last round's.", "",
            "| round | mining teacher | trained from |", "| --- | --- | --- |",
            *[f"| {i} | {named(r['teacher'])} | {named(r['start'])} |" for i, r in enumerate(rounds, 1)], ""]


def _mining_section(ms: dict[str, Any] | None, mc: dict[str, Any]) -> list[str]:
    body = ["## Mining", ""]
    if ms:
        f = ms.get("settings", {})
        rule = {"perc_pos": f"perc_pos (drop a candidate scoring above {f.get('perc')} x the positive)",
                "margin_pos": f"margin_pos (drop a candidate scoring above the positive - {f.get('margin')})"}.get(
            f.get("strategy"), str(f.get("strategy")))
        rows = [("teacher", (ms.get("teacher") or {}).get("model", (mc.get("teacher") or {}).get("model", "?"))),
                ("data", (ms.get("data") or {}).get("source", "?")),
                ("filter", rule),
                ("candidates per query (top_k)", (ms.get("search") or {}).get("top_k", "?")),
                ("negatives per row", f.get("num_negatives")),
                ("(query, positive) rows in / written", f"{_fmt(ms.get('rows_in'))} / {_fmt(ms.get('rows_out'))}"),
                ("suspected false negatives dropped", _fmt((ms.get("filtered") or {}).get(f.get("strategy"), 0))),
                ("known positives dropped from candidates", _fmt((ms.get("filtered") or {}).get("positive", 0))),
                ("rows short of negatives", f"{_fmt(ms['shortage']['rows'])} ({ms['shortage']['policy']}"
                 + (f": {_fmt(ms['shortage']['padded_negatives'])} random negatives padded, scored by the teacher)"
                    if ms["shortage"]["policy"] == "pad_random" else ")")),
                ("median teacher score: positive / chosen negative",
                 f"{_fmt(ms['scores']['positive'].get('p50', float('nan')))} / "
                 f"{_fmt(ms['scores']['negative'].get('p50', float('nan')))}")]
        body += ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
    else:
        body += ["No mining record was found (no `stats.json` of a koret mine run).", ""]
    return body


def _training_section(tm: dict[str, Any] | None, tcfg: dict[str, Any], base_model: str | None,
                      reranker: bool, adapter: bool = False) -> list[str]:
    body = ["## Training", ""]
    if tm:
        lc = tcfg.get("loss") or {}
        rows = [("base model", base_model or "?"), ("loss", tm.get("loss"))]
        if not reranker:
            rows += [("guide", tm.get("guide")),
                     ("margin strategy / margin", f"{lc.get('margin_strategy', '?')} / {lc.get('margin', '?')}")]
        rows += [("training rows x negatives", f"{_fmt(tm.get('train_rows'))} x {tm.get('num_negatives')}"),
                ("global batch size", f"{tm.get('global_batch_size')} ({tm.get('world_size')} process(es) x "
                                      f"{tm.get('per_device_batch_size')})"),
                ("learning rate", tm.get("learning_rate")), ("epochs", tm.get("epochs")),
                ("steps", tm.get("steps")), ("precision", tm.get("precision")),
                ("hardware", tm.get("device")), ("final loss", _fmt(tm.get("final_loss"))),
                ("wall time", f"{tm.get('wall_seconds', 0):.0f} s")]
        if tm.get("lora"):
            rows.insert(2, ("LoRA", lora_words(tm["lora"], base_model, adapter)))
        body += ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
        body += _sources_table(tm)
    else:
        body += ["No training record was found (no `metrics.json` of a koret train run).", ""]
    return body


def _filter_words(f: dict[str, Any] | None) -> str:
    """A source's negatives, in words: the filter of the mine that wrote them and the rows it kept."""
    if not f:
        return "no mined negatives (pairs: in-batch negatives only)"
    rule = {"perc_pos": f"perc_pos {f.get('perc')}", "margin_pos": f"margin_pos {f.get('margin')}",
            "abs": f"abs, max score {f.get('max_score')}"}.get(f.get("strategy"), str(f.get("strategy")))
    if f.get("scale") == "calibrated":
        rule += " (calibrated scale)"
    kept = f", {_fmt(f['rows_out'])} of {_fmt(f['rows_in'])} rows kept" if f.get("rows_in") is not None else ""
    return f"{rule}, {f.get('num_negatives')} negatives{kept}"


def _sources_table(tm: dict[str, Any]) -> list[str]:
    """Several sources (metrics.json's ``sources``): each with its rows, weight, filter and prompts."""
    sources = tm.get("sources") or []
    if not sources:
        return []
    prompts = any("query_prompt" in s for s in sources)
    head = "| source | training rows | weight | batches trained | negatives (filter) |" + (
        " query prompt | passage prompt |" if prompts else "")
    lines = [f"Every batch held the rows of one source (sampler: {tm.get('sampler', 'proportional')}; in-batch "
             "negatives never cross sources).", "", head,
             "| --- | --- | --- | --- | --- |" + (" --- | --- |" if prompts else "")]
    for s in sources:
        row = (f"| {s['name']} | {_fmt(s.get('rows'))} | {s.get('weight', 1.0):g} | {_fmt(s.get('batches', '?'))} | "
               f"{_filter_words(s.get('filter'))} |")
        if prompts:
            row += f" `{s.get('query_prompt', '')!r}` | `{s.get('passage_prompt', '')!r}` |"
        lines.append(row)
    return [*lines, ""]


def _evaluation_section(ev: dict[str, Any] | None, base_eval: dict[str, Any] | None,
                        trained_eval: dict[str, Any] | None, reranker: bool) -> list[str]:
    body = ["## Evaluation", ""]
    if ev and trained_eval:
        from koret.evaluate import markdown_table, suite_markdown

        entries = [e for e in (base_eval, trained_eval) if e]
        what = (f"the reranker reorders the top {trained_eval.get('rerank_top_k')} of the first row's retrieval"
                if reranker and trained_eval.get("reranks") else "exact search")
        if ev.get("sets"):  # a suite: the two rows on each set, then on the macro average
            names = [e["name"] for e in entries]
            shown = {"models": entries, "sets": {
                n: {**b, "models": [m for name in names for m in b["models"] if m["name"] == name]}
                for n, b in ev["sets"].items()}}
            body += [f"Data: {len(ev['sets'])} test sets, {ev['data']['queries']:,} queries in all; {what}; metrics "
                     "as defined by trec_eval. In each table the first row is the baseline.", "",
                     suite_markdown(shown, level="###")]
        else:
            body += [f"Data: `{ev['data']['source']}`, {ev['data']['queries']:,} queries, "
                     f"{ev['data']['passages']:,} passages; {what}; metrics as defined by trec_eval. The first row "
                     "is the baseline.", "", markdown_table(entries)]
    else:
        body += ["No evaluation record was found (run `koret eval` with the base and the trained model"
                 + (", and --reranker for a reranker)." if reranker else ")."), ""]
    return body


def lora_words(lora: dict[str, Any], base_model: str | None, adapter: bool) -> str:
    """The card's LoRA row: the adapter's settings, how much of the model trained, and what the folder holds."""
    targets = ", ".join(lora["target_modules"]) if lora.get("target_modules") else "all-linear"
    trained = (f"; {_fmt(lora['trainable_parameters'])} of {_fmt(lora['total_parameters'])} parameters trained"
               if lora.get("trainable_parameters") else "")
    held = (f"this repository is the adapter: loading it needs peft (`pip install peft`) and the base model "
            f"`{base_model or '?'}`" if adapter else "merged into the weights (they load without peft)")
    return f"r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, {targets}{trained}; {held}"


LOSS_WORDS = {
    "gist": "GISTEmbedLoss (a guide model masks suspected false negatives in the batch)",
    "cached_gist": "CachedGISTEmbedLoss (GISTEmbedLoss with GradCache)",
    "mnrl": "MultipleNegativesRankingLoss (no guide model)",
    "cached_mnrl": "CachedMultipleNegativesRankingLoss (no guide model, GradCache)",
}
DISTILL_WORDS = {
    "kl": "KL divergence to the teacher's score distribution over the positive and hard negatives "
          "(DistillKLDivLoss)",
    "margin_mse": "the teacher's positive - negative score margins (MarginMSELoss)",
}


def describe_recipe(train_metrics: dict[str, Any] | None, mine_stats: dict[str, Any] | None) -> str:
    """One paragraph saying what was actually done: mining or not, the loss, hard negatives or in-batch only."""
    if not train_metrics:
        return "A Korean text retriever prepared with koret (no training record was found)."
    if train_metrics.get("kind") == "reranker":
        negs = int(train_metrics.get("num_negatives") or 0)
        source = (f"hard negatives mined with the teacher `{(mine_stats.get('teacher') or {}).get('model', '?')}`"
                  if mine_stats else "hard negatives given in the training data" if negs
                  else "(query, passage) pairs with in-batch negatives only")
        return (f"A Korean cross-encoder reranker fine-tuned with koret on {source}, with the "
                f"`{train_metrics.get('loss')}` loss ({negs} hard negative(s) per query).")
    loss = LOSS_WORDS.get(str(train_metrics.get("loss")), str(train_metrics.get("loss")))
    negs = int(train_metrics.get("num_negatives") or 0)
    if mine_stats:
        f = mine_stats.get("settings", {})
        data = (f"hard negatives mined with the teacher `{(mine_stats.get('teacher') or {}).get('model', '?')}` and "
                f"filtered with {f.get('strategy', '?')} (NV-Retriever's positive-aware false-negative filtering)")
    elif negs:
        data = "hard negatives given in the training data (not mined by koret)"
    else:
        data = "(query, passage) pairs without hard negatives: the other passages of each batch are the negatives"
    per_row = f", {negs} hard negative(s) per query" if negs else ""
    distill = train_metrics.get("distill")
    if distill:
        what = f"distillation of {DISTILL_WORDS.get(distill.get('name'), distill.get('name'))}"
        loss = what if train_metrics.get("loss") == "none" else f"{loss} plus {distill.get('weight')} x {what}"
    return f"A Korean text retriever fine-tuned with koret: {data}; trained with {loss}{per_row}."


def _hub_datasets(train_cfg: dict[str, Any], mine_cfg: dict[str, Any]) -> list[str]:
    """Hub dataset ids among the data sources (local files are not datasets on the Hub)."""
    out = []
    named = [d.get("train") for c in (mine_cfg, train_cfg) for d in ((c.get("data") or {}).get("sources") or [])]
    for src in ((mine_cfg.get("data") or {}).get("train"), (train_cfg.get("data") or {}).get("train"), *named):
        if src and not Path(str(src).split("#")[0]).exists() and str(src).count("/") == 1 \
                and not str(src).startswith((".", "/", "~")):
            out.append(src)
    return out


# --------------------------------------------------------------------------------------------- stage


def stage_folder(cfg: PushConfig, dest: Path) -> list[str]:
    """Write the folder that would be uploaded (model files in safetensors + README.md card) to ``dest``."""
    model_dir = Path(cfg.model)
    check_model_folder(model_dir)
    sources = gather_sources(cfg)
    card = build_card(cfg, sources)

    def fill(tmp: Path) -> None:
        merged_lora = is_adapter(model_dir / "adapter")  # final/ of a LoRA run: the merged weights go, not adapter/
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("training_args.bin", "*.tmp", ".*",
                                                                      *(["adapter"] if merged_lora else [])))
        if not list(tmp.rglob("*.safetensors")):
            from sentence_transformers import CrossEncoder, SentenceTransformer

            kind = CrossEncoder if is_reranker(model_dir) else SentenceTransformer
            kind(str(model_dir), device="cpu").save(str(tmp), safe_serialization=True)
            for f in tmp.rglob("pytorch_model.bin"):
                f.unlink()
        write_text(tmp / "README.md", card)

    return replace_folder(dest, fill)


def replace_folder(dest: Path, fill: Any) -> list[str]:
    """Write a folder whole: ``fill(tmp)`` writes it beside ``dest`` (``tmp`` does not exist yet), which it then
    replaces; a failure leaves ``dest`` as it was. Returns the files, relative to ``dest``, sorted."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
    except BaseException:  # no half-written folder is left beside dest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def push(cfg: PushConfig, dry_run: str | Path | None = None, show_card: bool = True) -> dict[str, Any]:
    """Upload (or, with ``dry_run`` or ``push.dry_run: true``, only stage) the model.

    Returns {"url" | "dry_run", "files", ...}. A dry run writes the folder to ``dry_run`` (default
    ``push.dry_run_dir``) and touches no network.
    """
    if dry_run is None and cfg.dry_run:
        dry_run = cfg.dry_run_dir
    if dry_run is not None:
        return staged(Path(dry_run), stage_folder(cfg, Path(dry_run)), cfg.repo_id, show_card)
    check_repo_id(cfg.repo_id, "push.repo_id", "your-name/koret-ko-retriever")
    check_model_folder(Path(cfg.model))
    return upload(cfg, lambda dest: stage_folder(cfg, dest), "model", cfg.commit_message)


def staged(dest: Path, files: list[str], repo_id: str | None, show_card: bool) -> dict[str, Any]:
    """A dry run's result: the staged files (and the card, with ``show_card``) shown, nothing uploaded."""
    show(table(f"koret push --dry-run: {dest}", ["file", "bytes"], [[f, (dest / f).stat().st_size] for f in files]))
    if show_card:
        info((dest / "README.md").read_text(encoding="utf-8"))
    return {"dry_run": str(dest), "files": files, "repo_id": repo_id}


def check_repo_id(repo_id: str | None, key: str, example: str) -> str:
    """``repo_id`` when it is a valid ``owner/name``, else a one-line error naming ``key``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise KoretError(f"{key}: required key is missing", f"e.g. --set {key.partition('.')[2]}={example}")
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("expected owner/name")
    except HFValidationError as exc:
        raise KoretError(f"{key}: {repo_id!r} is not a valid repo id ({exc})",
                         "use owner/name with letters, digits, '-', '_', '.'") from None
    return repo_id


def upload(cfg: PushConfig, stage: Any, repo_type: str, commit_message: str) -> dict[str, Any]:
    """Stage a folder (``stage(dest)`` writes it and returns its files) in a temporary folder and upload it to
    ``cfg.repo_id`` (a ``repo_type`` repo, created if missing; ``cfg.revision``'s branch too). The token is read
    here, handed to HfApi and nowhere else: never printed, never written."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise KoretError("push: no Hugging Face token", "set HF_TOKEN or run `huggingface-cli login`")
    import tempfile

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="koret-push-") as tmpdir:
        staged = Path(tmpdir) / repo_type
        files = stage(staged)
        if cfg.create_repo:
            _call(lambda: api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type=repo_type),
                  "create the repo", cfg)
        if cfg.revision:
            _call(lambda: api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True, repo_type=repo_type),
                  "create the branch", cfg)
        commit = _call(lambda: api.upload_folder(repo_id=cfg.repo_id, folder_path=str(staged), repo_type=repo_type,
                                                 revision=cfg.revision, commit_message=commit_message),
                       "upload", cfg)
    url = (f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{cfg.repo_id}"
           + (f"/tree/{cfg.revision}" if cfg.revision else ""))
    show(table("koret push", ["", "value"], [["repo", f"{cfg.repo_id} ({repo_type})"], ["url", url],
                                             ["files", len(files)], ["commit", getattr(commit, "oid", "") or ""]]))
    return {"url": url, "files": files, "repo_id": cfg.repo_id, "commit": getattr(commit, "oid", None)}


def push_stage(cfg: PushConfig) -> dict[str, Any]:
    """The push stage of ``koret run``: as :func:`push`, without printing the card."""
    return push(cfg, show_card=False)


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _is_connection_error(exc: BaseException) -> bool:
    """Connection resets, refusals and timeouts (of the socket, requests or httpx): worth retrying."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutException",
                         "TransportError", "NetworkError", "RemoteProtocolError", "ChunkedEncodingError"})


def _call(fn: Any, what: str, cfg: PushConfig) -> Any:
    """Run one Hub call; 401/403 are one-line errors, transient failures are retried with backoff."""
    delay = 1.0
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except Exception as exc:  # huggingface_hub raises HTTP and connection errors of several types
            status = _status(exc)
            if status == 401:
                raise KoretError(f"push: could not {what}: the token was rejected (401, bad or expired token)",
                                 "check HF_TOKEN or run `huggingface-cli login` again") from None
            if status == 403:
                raise KoretError(f"push: could not {what} in {cfg.repo_id!r}: no write access (403)",
                                 "use a token with write permission for that owner") from None
            if status is None and not _is_connection_error(exc):
                raise  # not an HTTP or network failure: a bug, with its traceback
            transient = status is None or status >= 500 or status == 429
            if not transient:
                raise KoretError(f"push: could not {what} (HTTP {status}: {str(exc).splitlines()[0][:200]})") from None
            if attempt == cfg.retries:
                detail = f"HTTP {status}" if status else type(exc).__name__
                raise KoretError(f"push: could not {what} after {attempt + 1} attempt(s) ({detail})",
                                 "nothing was claimed as uploaded; rerun koret push") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover

