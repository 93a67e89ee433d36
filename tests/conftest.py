"""Shared fixtures: a small Korean data set and tiny models built locally (no network, random weights).

The tokenizer is a WordPiece vocabulary learned on the fixture's own Korean text (by koret.synth's own BPE
merges, the same in every process); the sentence-transformer is a 2-layer BERT with mean pooling and L2
normalization; the cross-encoder is the same BERT with a one-logit head.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from koret.synth import build_random_bert, build_random_sentence_transformer, generate  # noqa: E402

# Hand-written pairs with the usual difficulties: one query with two positives, near-duplicate passages,
# passages that differ only in whitespace, and mixed Korean/English.
HANDWRITTEN = [
    ("서울에서 가장 오래된 시장은 어디인가?", "남문시장은 이 도시에서 가장 오래된 재래시장으로 조선 후기부터 장이 섰다."),
    ("서울에서 가장 오래된 시장은 어디인가?", "동문시장 역시 오래된 시장이지만 남문시장보다 늦게 문을 열었다."),
    ("김치를 오래 보관하는 방법은?", "김치는 영하 1도 안팎의 김치냉장고에 두면 발효가 느려져 오래 보관할 수 있다."),
    ("한글은 누가 만들었나?", "한글은 세종이 집현전 학자들과 함께 1443년에 창제하였다."),
    ("GPU 메모리가 부족할 때 배치를 키우는 방법은?", "GradCache는 미니배치로 나누어 임베딩을 구한 뒤 그래디언트를 모아 큰 배치를 흉내 낸다."),
    ("여름 장마는 보통 언제 시작하나?", "한반도의 장마는 대개 6월 하순에 제주에서 시작해 북쪽으로 올라간다."),
]


def fixture_pairs(entities: int = 60, seed: int = 7) -> list[dict[str, str]]:
    synth = generate(entities, seed=seed, paraphrase_rate=0.3, queries_per_entity=2)
    rows = [{"query": q, "positive": p} for q, p in HANDWRITTEN]
    rows += [{"query": p["query"], "positive": p["positive"]} for p in synth.pairs]
    return rows


@pytest.fixture(scope="session")
def pairs() -> list[dict[str, str]]:
    return fixture_pairs()


@pytest.fixture(scope="session")
def extra_corpus() -> list[str]:
    return generate(60, seed=7, paraphrase_rate=0.3).extra_corpus + [
        "장마 기간에는 습도가 높아 곰팡이가 피기 쉽다.",
        "남문시장   근처에는 오래된 국숫집이 많다.",
    ]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, pairs, extra_corpus) -> Path:
    root = tmp_path_factory.mktemp("data")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for row in pairs:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (root / "corpus.txt").write_text("\n".join(extra_corpus) + "\n", encoding="utf-8")
    return root


def _corpus_for_tokenizer(pairs: list[dict[str, str]], extra: list[str]) -> list[str]:
    texts = [r["query"] for r in pairs] + [r["positive"] for r in pairs] + extra
    return texts + ["query: ", "passage: "]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, pairs, extra_corpus) -> Path:
    """A tiny SentenceTransformer folder with prompts 'query' / 'passage'."""
    root = tmp_path_factory.mktemp("models")
    return build_random_sentence_transformer(root / "tiny-st", _corpus_for_tokenizer(pairs, extra_corpus),
                                             prompts={"query": "query: ", "passage": "passage: "}, seed=0,
                                             lexical=True)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, pairs, extra_corpus) -> Path:
    from sentence_transformers import CrossEncoder

    root = tmp_path_factory.mktemp("ce")
    # lexical: its scores spread over 0.14 instead of 0.0002 (a plain random BERT scores every pair alike), so the
    # order of rescored candidates follows the texts, not float noise from how pairs were batched (one process
    # vs several: the 2-process equality test failed once in about ten runs here)
    bert = build_random_bert(root / "bert", _corpus_for_tokenizer(pairs, extra_corpus), seed=1, num_labels=1,
                             lexical=True)
    ce = CrossEncoder(str(bert), num_labels=1, device="cpu", max_length=96)
    path = root / "tiny-ce"
    ce.save(str(path))
    return path


INSTRUCTION = "Instruct: Given a Korean question, retrieve passages that answer it\nQuery:"


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory, pairs, extra_corpus) -> Path:
    """A tiny Qwen3-style causal LM (2 layers, 64 wide, random weights) with a BPE tokenizer trained on the
    fixture's text: a plain transformers folder whose tokenizer appends no EOS, as a base LM's does."""
    from koret.synth import build_random_decoder

    root = tmp_path_factory.mktemp("decoder")
    return build_random_decoder(root / "tiny-lm", _corpus_for_tokenizer(pairs, extra_corpus) + [INSTRUCTION],
                                seed=0, lexical=True)


@pytest.fixture(scope="session")
def tiny_decoder_embedder(tmp_path_factory, pairs, extra_corpus) -> Path:
    """The same kind of decoder as a SentenceTransformer folder, as decoder embedders ship (Qwen3-Embedding's
    layout): last-token pooling, left padding, EOS appended, an instruction prompt for queries."""
    from koret.synth import build_random_decoder_embedder

    root = tmp_path_factory.mktemp("decoder-st")
    return build_random_decoder_embedder(root / "tiny-dec-st", _corpus_for_tokenizer(pairs, extra_corpus) + [INSTRUCTION],
                                         prompts={"query": INSTRUCTION, "document": ""}, seed=1, lexical=True)


@pytest.fixture()
def rng() -> random.Random:
    return random.Random(0)


def write_mine_config(path: Path, **sections) -> Path:
    """Write a YAML config; keyword arguments are sections (dicts)."""
    import yaml

    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    return path
