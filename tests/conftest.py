"""Shared fixtures: a small Korean data set and tiny models built locally (no network, random weights).

The tokenizer is a WordPiece vocabulary trained with `tokenizers` on the fixture's own Korean text; the
sentence-transformer is a 2-layer BERT with mean pooling and L2 normalization; the cross-encoder is the same
BERT with a one-logit head.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from koret.synth import generate  # noqa: E402

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


def build_tiny_bert(out: Path, texts: list[str], seed: int = 0, num_labels: int | None = None,
                    lexical: bool = False) -> Path:
    """Save a tiny random BERT (+ WordPiece tokenizer trained on ``texts``) to ``out``.

    A random BERT maps every text to nearly the same direction (cosine ~0.93 for any pair), which makes any
    filtering test degenerate. With ``lexical=True`` the blocks' output projections start at zero, so each
    layer is the identity and mean pooling averages random token vectors: a random-projection bag of words,
    whose scores follow word overlap. Training still moves every weight.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=1200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=130, initializer_range=0.5 if lexical else 0.02)
    torch.manual_seed(seed)
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    if lexical:
        with torch.no_grad():
            base = model if num_labels is None else model.bert
            base.embeddings.position_embeddings.weight.zero_()
            base.embeddings.token_type_embeddings.weight.zero_()
            for layer in base.encoder.layer:
                for lin in (layer.attention.output.dense, layer.output.dense):
                    lin.weight.mul_(0.01)
                    lin.bias.zero_()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, pairs, extra_corpus) -> Path:
    """A tiny SentenceTransformer folder with prompts 'query' / 'passage'."""
    from sentence_transformers import SentenceTransformer, models

    root = tmp_path_factory.mktemp("models")
    bert = build_tiny_bert(root / "bert", _corpus_for_tokenizer(pairs, extra_corpus), seed=0, lexical=True)
    word = models.Transformer(str(bert), max_seq_length=96)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu",
                             prompts={"query": "query: ", "passage": "passage: "})
    path = root / "tiny-st"
    st.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, pairs, extra_corpus) -> Path:
    from sentence_transformers import CrossEncoder

    root = tmp_path_factory.mktemp("ce")
    bert = build_tiny_bert(root / "bert", _corpus_for_tokenizer(pairs, extra_corpus), seed=1, num_labels=1)
    ce = CrossEncoder(str(bert), num_labels=1, device="cpu", max_length=96)
    path = root / "tiny-ce"
    ce.save(str(path))
    return path


@pytest.fixture()
def rng() -> random.Random:
    return random.Random(0)


def write_mine_config(path: Path, **sections) -> Path:
    """Write a YAML config; keyword arguments are sections (dicts)."""
    import yaml

    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    return path
