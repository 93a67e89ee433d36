#!/usr/bin/env bash
# Reranker quality on real Korean data, sized for the 2-core CPU machine (about 35 minutes), with the documented
# commands only. Needs ../shared (KorQuAD 1.0 dev, the e5-small builder); not part of make test.
#   1. mine KorQuAD articles 0-111 with multilingual-e5-small as teacher (3 hard negatives per query);
#   2. train a reranker from the e5-small body with a new one-logit head (mnrl over 1 + 3, first RR_QUERIES rows);
#   3. evaluate on the held-out articles 112-139: e5-small retrieval alone vs its top RR_TOP_K reranked.
# Results: runs/reranker-quality/{mine,reranker,eval}/, the eval table in eval/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false KORET_LOG_INTERVAL=${KORET_LOG_INTERVAL:-60}
PY=${PYTHON:-.venv/bin/python}
KORET="$PY -m koret"
DATA=${DATA:-../shared/data/korquad-v1-dev/KorQuAD_v1.0_dev.json}
OUT=${OUT_DIR:-runs/reranker-quality}
RR_QUERIES=${RR_QUERIES:-480}
RR_TOP_K=${RR_TOP_K:-10}
EVAL_QUERIES=${EVAL_QUERIES:-300}
E5=$(../shared/tools/make-e5-small.sh "" "$PY")
mkdir -p "$OUT"
start=$(date +%s)
$KORET mine -c configs/mine.yaml --set data.train="$DATA#0:112" --set data.corpus=null --set teacher.model="$E5" \
  --set teacher.max_seq_length=256 --set search.top_k=30 --set filter.num_negatives=3 \
  --set output.dir="$OUT/mine" --set cache_dir="$OUT/cache"
t_mine=$(date +%s)
$KORET train-reranker -c configs/reranker.yaml --set model.name="$E5" --set model.max_length=128 \
  --set data.train="$OUT/mine/train.parquet" --set data.limit="$RR_QUERIES" --set loss.name=mnrl \
  --set loss.in_batch_negatives=1 --set args.output_dir="$OUT/reranker" --set args.per_device_train_batch_size=16 \
  --set args.learning_rate=1e-4 --set args.logging_steps=5 --set args.save_strategy=no
t_train=$(date +%s)
cat > "$OUT/eval.yaml" <<YAML
data: {path: "$DATA#112:140", max_queries: $EVAL_QUERIES}
models: [{name: "$E5", label: e5-small, max_seq_length: 256}]
rerankers: [{name: "$OUT/reranker/final", label: reranker, max_length: 128}]
rerank_top_k: $RR_TOP_K
k: [1, 3, 5, 10]
output: {dir: "$OUT/eval", markdown: "$OUT/eval/table.md"}
cache_dir: "$OUT/cache"
YAML
$KORET eval -c "$OUT/eval.yaml"
t_eval=$(date +%s)
echo "seconds: mine $((t_mine - start)), train-reranker $((t_train - t_mine)), eval $((t_eval - t_train))" \
  | tee "$OUT/seconds.txt"
