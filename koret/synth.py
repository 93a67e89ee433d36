"""Synthetic Korean retrieval data: facts about fictional entities, written for koret (no dataset is copied).

Every entity (a city, a person, a company, a river, a festival) gets one passage built from a template of its
kind, and questions about its attributes. Entities of the same kind share the template, so their passages are
natural hard negatives for each other (same words, different names and numbers). For a share of the entities a
*paraphrase* of the positive passage (same facts, other wording) is planted in the extra corpus: it is a false
negative that a positive-aware filter must catch.

Used by the quickstart sample, by the tests and by the scale benchmarks (any size, deterministic by seed)::

    koret synth --entities 2000 --out data/synth
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SYLLABLES = list("가온누리다솔마루하빛새벼린채윤서하준도현시우라온별찬결아람슬기해나봄")
_REGIONS = ["동쪽 해안", "서부 평야", "남쪽 산간", "북부 고원", "중부 분지", "호숫가", "섬 지역", "강 하류"]
_PRODUCTS = ["배", "인삼", "녹차", "도자기", "비단", "소금", "한지", "사과", "김", "옹기", "버섯", "꿀"]
_FIELDS = ["천문학", "조선 공학", "식물학", "음향학", "도시 계획", "해양 생물학", "언어학", "로봇 공학"]
_PRIZES = ["청람상", "누리과학상", "한빛문화상", "새솔학술상", "바다별상"]
_INDUSTRIES = ["배터리", "반도체 장비", "해조류 가공", "게임 엔진", "자전거", "의료 로봇", "친환경 섬유"]
_FOODS = ["떡", "국수", "전", "만두", "식혜", "비빔밥", "김밥"]
_MONTHS = [f"{m}월" for m in range(1, 13)]


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def josa(word: str, pair: str) -> str:
    """Attach the particle that fits the word's last syllable: ``josa("사과", "이/가") == "사과가"``.

    ``pair`` is "after a final consonant / after a vowel" (은/는, 이/가, 을/를, 과/와, 으로/로); a final ㄹ takes 로.
    """
    with_final, without = pair.split("/")
    last = word[-1]
    code = ord(last) - 0xAC00
    if not 0 <= code < 11172:
        return word + with_final
    final = code % 28
    if pair == "으로/로" and final == 8:  # ㄹ
        return word + without
    return word + (with_final if final else without)


@dataclass
class SynthData:
    pairs: list[dict[str, str]] = field(default_factory=list)  # {"query", "positive", "entity"}
    extra_corpus: list[str] = field(default_factory=list)  # paraphrases (planted false negatives) + distractors
    planted: list[dict[str, str]] = field(default_factory=list)  # {"positive", "paraphrase"}


def _city(rng: random.Random, name: str) -> tuple[str, str, list[str]]:
    region, year, pop, prod = rng.choice(_REGIONS), rng.randint(1200, 1990), rng.randint(2, 95), rng.choice(_PRODUCTS)
    mayor = _name(rng, 3)
    passage = (f"{name}시는 {region}에 있는 도시로, {year}년에 처음 세워졌다. 인구는 약 {pop}만 명이며 "
               f"특산물은 {prod}이다. 현재 시장은 {mayor}이다.")
    para = (f"{region}에 자리한 {name}시의 역사는 {year}년에 시작되었다. 이 도시에는 약 {pop}만 명이 살고, "
            f"{josa(prod, '이/가')} 특산물로 이름나 있으며 {mayor} 시장이 시정을 맡고 있다.")
    queries = [f"{name}시는 언제 세워졌나?", f"{name}시의 특산물은 무엇인가?", f"{name}시의 시장은 누구인가?"]
    return passage, para, queries


def _person(rng: random.Random, name: str) -> tuple[str, str, list[str]]:
    fld, born, prize, city = rng.choice(_FIELDS), rng.randint(1890, 1995), rng.choice(_PRIZES), _name(rng, 2)
    topic = josa(name, "은/는")
    passage = (f"{topic} {born}년 {city}에서 태어난 {fld} 연구자이다. 그는 새로운 측정 방법을 제안한 공로로 "
               f"{josa(prize, '을/를')} 받았다.")
    para = (f"{josa(fld, '을/를')} 연구한 {topic} {city} 출신으로 {born}년에 출생했다. 측정 방법에 관한 업적으로 "
            f"{prize} 수상자가 되었다.")
    queries = [f"{topic} 어느 분야의 연구자인가?", f"{josa(name, '이/가')} 받은 상은 무엇인가?",
               f"{topic} 몇 년에 태어났나?"]
    return passage, para, queries


def _company(rng: random.Random, name: str) -> tuple[str, str, list[str]]:
    ind, year, staff, ceo = rng.choice(_INDUSTRIES), rng.randint(1950, 2022), rng.randint(20, 9000), _name(rng, 3)
    passage = (f"{name}전자는 {year}년에 설립된 {ind} 회사이다. 직원은 {staff}명이며 대표는 {ceo}이다.")
    para = (f"{josa(ind, '을/를')} 만드는 {name}전자는 {year}년에 문을 열었고, {ceo} 대표 아래 {staff}명이 일한다.")
    queries = [f"{name}전자는 무엇을 만드는 회사인가?", f"{name}전자의 대표는 누구인가?",
               f"{name}전자는 언제 설립되었나?"]
    return passage, para, queries


def _river(rng: random.Random, name: str) -> tuple[str, str, list[str]]:
    length, source, mouth = rng.randint(12, 480), _name(rng, 2) + "산", rng.choice(_REGIONS)
    passage = f"{name}강은 길이 {length}킬로미터의 강으로, {source}에서 시작해 {josa(mouth, '으로/로')} 흘러간다."
    para = f"{source}에서 발원하는 {name}강은 {length}킬로미터를 흘러 {mouth}에 이른다."
    queries = [f"{name}강의 길이는 얼마인가?", f"{name}강은 어디에서 시작되나?"]
    return passage, para, queries


def _festival(rng: random.Random, name: str) -> tuple[str, str, list[str]]:
    month, food, visitors = rng.choice(_MONTHS), rng.choice(_FOODS), rng.randint(1, 90)
    passage = (f"{name}축제는 매년 {month}에 열리는 축제로, {food} 만들기 체험이 유명하다. "
               f"해마다 약 {visitors}만 명이 찾는다.")
    para = f"해마다 {month}이면 {name}축제가 열려 약 {visitors}만 명이 {food} 만들기 체험을 즐긴다."
    queries = [f"{name}축제는 언제 열리나?", f"{name}축제에서 유명한 체험은 무엇인가?"]
    return passage, para, queries


_KINDS = [_city, _person, _company, _river, _festival]


def generate(entities: int = 200, seed: int = 0, paraphrase_rate: float = 0.2,
             queries_per_entity: int = 2, distractors: int = 0) -> SynthData:
    """Generate ``entities`` fictional entities (names unique), their passages, questions and paraphrases.

    ``distractors`` adds that many extra passages of entities that no question asks about.
    """
    rng = random.Random(seed)
    out = SynthData()
    used: set[str] = set()

    def fresh_name() -> str:
        start = 2 if len(used) < 400 else 3 if len(used) < 16_000 else 4
        for length in range(start, start + 4):
            for _ in range(20):
                cand = _name(rng, length)
                if cand not in used:
                    used.add(cand)
                    return cand
        cand = f"{_name(rng, 4)}{len(used)}"
        used.add(cand)
        return cand

    for i in range(entities):
        kind = _KINDS[i % len(_KINDS)]
        name = fresh_name()
        passage, para, queries = kind(rng, name)
        for q in rng.sample(queries, k=min(queries_per_entity, len(queries))):
            out.pairs.append({"query": q, "positive": passage, "entity": name})
        if rng.random() < paraphrase_rate:
            out.extra_corpus.append(para)
            out.planted.append({"positive": passage, "paraphrase": para})
    for i in range(distractors):
        passage, _, _ = _KINDS[i % len(_KINDS)](rng, fresh_name())
        out.extra_corpus.append(passage)
    return out


def write(data: SynthData, out_dir: str | Path, eval_fraction: float = 0.0, seed: int = 0) -> dict[str, str]:
    """Write ``train.jsonl`` (+ ``eval.jsonl`` split by entity), ``corpus.txt`` and ``planted.jsonl``."""
    from koret.io import write_text

    out = Path(out_dir)
    entities = sorted({p["entity"] for p in data.pairs})
    random.Random(seed).shuffle(entities)
    held = set(entities[: int(round(len(entities) * eval_fraction))])
    files: dict[str, str] = {}

    def dump(name: str, rows: list[dict[str, str]]) -> None:
        write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[name] = str(out / name)

    dump("train.jsonl", [{"query": p["query"], "positive": p["positive"]} for p in data.pairs
                         if p["entity"] not in held])
    if held:
        dump("eval.jsonl", [{"query": p["query"], "positive": p["positive"]} for p in data.pairs
                            if p["entity"] in held])
    write_text(out / "corpus.txt", "".join(t + "\n" for t in data.extra_corpus))
    files["corpus.txt"] = str(out / "corpus.txt")
    dump("planted.jsonl", data.planted)
    return files


def _word_counts(texts: list[str], normalizer: Any, pre_tokenizer: Any) -> dict[str, int]:
    """How often each word occurs in ``texts``, words as a tokenizer with this normalizer and pre-tokenizer
    cuts them (what ``Tokenizer.train_from_iterator`` counts).

    Each distinct space-delimited piece (a text's first piece, then " " + each later one) is normalized and
    pre-tokenized once: the words are the same as the whole text's (NFC composes nothing across a space; BERT's
    pre-tokenizer drops the space, Metaspace makes it the next word's "▁"), and long texts go over 10x faster
    (the pre-tokenizer's time grows faster than a text's length).
    """
    pieces: dict[str, int] = {}
    for text in texts:
        first, *rest = text.split(" ")
        pieces[first] = pieces.get(first, 0) + 1
        for piece in rest:
            piece = " " + piece
            pieces[piece] = pieces.get(piece, 0) + 1
    counts: dict[str, int] = {}
    for piece, n in pieces.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)):
            if word:
                counts[word] = counts.get(word, 0) + n
    return counts


def _train_bpe(word_counts: dict[str, int], vocab_size: int, special_tokens: list[str],
               prefix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges over ``word_counts``: the same result in every process (the Rust trainers of
    ``tokenizers`` break ties in pair counts by hash order, so their vocabulary changes from run to run).

    A word starts as its characters; with a ``prefix`` ("##" for WordPiece) every character after the first
    carries it, and a merge of ``a`` and ``##b`` gives ``ab``. Each step merges the most frequent adjacent pair
    (ties: the lexicographically smallest pair) in every word. Returns the vocabulary and the merges in order.
    The vocabulary is the special tokens, the alphabet sorted (each character alone, and with the prefix where
    it follows another), then each new merge result; all of the alphabet is kept, merges go on only while the
    vocabulary is below ``vocab_size``. Pair counts are updated only for the words a merge touches, so thousands
    of merges over tens of thousands of words take seconds, not minutes.
    """
    import heapq
    from itertools import pairwise

    words = [[w[0]] + [prefix + c for c in w[1:]] for w in word_counts]
    freqs = list(word_counts.values())
    vocab: dict[str, int] = {}
    # every character on its own as well (as WordPieceTrainer's alphabet has it): a word that starts with a
    # character seen only inside words is then no [UNK]
    for token in special_tokens + sorted({c for w in word_counts for c in w} | {s for w in words for s in w}):
        vocab.setdefault(token, len(vocab))
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, (syms, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(syms):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            where.setdefault(pair, set()).add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue  # a stale entry: the pair's count changed since it was pushed
        merges.append((a, b))
        merged = a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)
        vocab.setdefault(merged, len(vocab))
        delta: dict[tuple[str, str], int] = {}
        for i in where.pop((a, b)):  # the order does not matter: each word changes on its own
            syms, out, j = words[i], [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            if len(out) == len(syms):
                continue  # a stale entry: an earlier merge already took this word's pair apart
            f = freqs[i]
            for pair in pairwise(syms):
                delta[pair] = delta.get(pair, 0) - f
            for pair in pairwise(out):
                delta[pair] = delta.get(pair, 0) + f
                where.setdefault(pair, set()).add(i)
            words[i] = out
        for pair, d in delta.items():
            if d:
                count = pair_counts.get(pair, 0) + d
                if count > 0:
                    pair_counts[pair] = count
                    heapq.heappush(heap, (-count, *pair))
                else:
                    pair_counts.pop(pair, None)
                    where.pop(pair, None)
    return vocab, merges


def build_random_bert(out: Path, texts: list[str], seed: int = 0, num_labels: int | None = None,
                      lexical: bool = False, hidden: int = 64, layers: int = 2, heads: int = 2,
                      intermediate: int | None = None, vocab_size: int = 1200, max_positions: int = 130) -> Path:
    """Save a random-weight BERT (+ a WordPiece tokenizer trained on ``texts``) to ``out``: no download.

    Used by the tests (a 2-layer, 64-wide model), the benchmarks and the GPU check (BERT-base or XLM-R-large
    shapes). Pass ``num_labels`` for a sequence-classification head (a cross-encoder).

    A random BERT maps every text to nearly the same direction (cosine ~0.93 for any pair), which makes any
    filtering test degenerate. With ``lexical=True`` the blocks' output projections start at zero, so each
    layer is the identity and mean pooling averages random token vectors: a random-projection bag of words,
    whose scores follow word overlap. Training still moves every weight.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    # the vocabulary WordPieceTrainer would learn (BPE merges over "##"-continued characters), without its
    # run-to-run differences (see _train_bpe)
    normalizer, pre_tokenizer = normalizers.NFC(), pre_tokenizers.BertPreTokenizer()
    vocab, _ = _train_bpe(_word_counts(texts, normalizer, pre_tokenizer), vocab_size,
                          ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], prefix="##")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()  # decode() joins the "##" pieces back into words
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions - 2)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or 2 * hidden,
                        max_position_embeddings=max_positions, initializer_range=0.5 if lexical else 0.02)
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


def build_random_sentence_transformer(out: Path, texts: list[str], prompts: dict[str, str] | None = None,
                                      max_seq_length: int = 96, **bert: object) -> Path:
    """A SentenceTransformer folder (random BERT, mean pooling, L2 normalization) at ``out``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    bert_dir = build_random_bert(Path(f"{out}-bert"), texts, **bert)  # type: ignore[arg-type]
    word = Transformer(str(bert_dir), max_seq_length=max_seq_length)
    pooling = Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pooling, Normalize()], device="cpu", prompts=prompts)
    model.save(str(out))
    return Path(out)


DECODER_EOS = "<|endoftext|>"


def build_random_decoder(out: Path, texts: list[str], seed: int = 0, lexical: bool = False, hidden: int = 64,
                         layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                         vocab_size: int = 1000, max_positions: int = 256) -> Path:
    """Save a random-weight Qwen3-style causal LM (+ a BPE tokenizer trained on ``texts``, EOS and pad
    ``<|endoftext|>``, and the 'yes' / 'no' tokens a decoder reranker reads) to ``out``: no download. Its
    tokenizer appends nothing to a text, as a base LM's does.

    Used by the tests (2 layers, 64 wide) and the LoRA benchmark. With ``lexical=True`` the EOS token's
    embedding is zero, so under last-token pooling (texts end with EOS) the first layer's query is zero, its
    attention uniform and the pooled state a random projection of the text's averaged token embeddings (the MLPs
    and later attention layers start near zero): scores follow word overlap instead of being near-equal for
    every pair. Training still moves every weight.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    normalizer, pre_tokenizer = normalizers.NFC(), pre_tokenizers.Metaspace()
    vocab, merges = _train_bpe(_word_counts(texts, normalizer, pre_tokenizer), vocab_size,
                               [DECODER_EOS, "<|unk|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|unk|>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace()
    tok.add_tokens(["yes", "no"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=DECODER_EOS, pad_token=DECODER_EOS,
                                   unk_token="<|unk|>", model_max_length=max_positions)
    eos = tok.token_to_id(DECODER_EOS)
    config = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    if lexical:
        with torch.no_grad():
            model.model.embed_tokens.weight[eos].zero_()
            for i, layer in enumerate(model.model.layers):
                layer.mlp.down_proj.weight.mul_(0.01)
                if i > 0:
                    layer.self_attn.o_proj.weight.mul_(0.01)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_random_decoder_embedder(out: Path, texts: list[str], prompts: dict[str, str] | None = None,
                                  max_seq_length: int = 96, **decoder: object) -> Path:
    """A SentenceTransformer folder of a random decoder as decoder embedders ship (Qwen3-Embedding's layout):
    last-token pooling, left padding, EOS appended by the tokenizer, L2 normalization, instruction prompts."""
    from sentence_transformers import SentenceTransformer

    from koret.encode import build_sentence_transformer, load_kwargs

    lm = build_random_decoder(Path(f"{out}-lm"), texts, **decoder)  # type: ignore[arg-type]
    model: SentenceTransformer = build_sentence_transformer(str(lm), key="decoder", pooling="lasttoken",
                                                            device="cpu", model_kwargs=load_kwargs("float32", "cpu"),
                                                            max_seq_length=max_seq_length)
    model.prompts = dict(prompts or {})
    model.save(str(out))
    return Path(out)
