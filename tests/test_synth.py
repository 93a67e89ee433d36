"""The tiny models' tokenizers (koret.synth): the same in every process, and real subword vocabularies."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

from conftest import INSTRUCTION, _corpus_for_tokenizer
from helpers import REPO

# builds both tokenizers (with the smallest models) from the fixture's kind of text into argv[1]
_BUILD = """
import sys
from pathlib import Path
from koret.synth import build_random_bert, build_random_decoder, generate
syn = generate(60, seed=7, paraphrase_rate=0.3)
texts = [p["query"] for p in syn.pairs] + [p["positive"] for p in syn.pairs] + syn.extra_corpus + ["query: "]
out = Path(sys.argv[1])
build_random_bert(out / "bert", texts, hidden=8, layers=1, heads=1)
build_random_decoder(out / "decoder", texts, hidden=8, layers=1, heads=2, kv_heads=1)
"""


def test_tokenizers_are_the_same_in_every_process(tmp_path):
    """tokenizers' Rust trainers broke ties in pair counts by hash order: the learned WordPiece vocabulary (not
    only its ids) changed from one process to the next, and with it every fixture model."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / run)], cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                   "PYTHONHASHSEED": hashseed})
             for run, hashseed in (("a", "1"), ("b", "2"))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for model in ("bert", "decoder"):
        a = (tmp_path / "a" / model / "tokenizer.json").read_bytes()
        assert a == (tmp_path / "b" / model / "tokenizer.json").read_bytes(), model


def _tokenizers(root: Path, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    from koret.synth import build_random_bert, build_random_decoder

    bert = build_random_bert(root / "bert", texts, hidden=8, layers=1, heads=1)
    decoder = build_random_decoder(root / "decoder", texts, hidden=8, layers=1, heads=2, kv_heads=1)
    return {"bert": AutoTokenizer.from_pretrained(bert), "decoder": AutoTokenizer.from_pretrained(decoder)}


def test_tokenizers_learn_subwords_and_decode_back(tmp_path, pairs, extra_corpus):
    texts = _corpus_for_tokenizer(pairs, extra_corpus) + [INSTRUCTION]
    korean = [r["positive"] for r in pairs]
    for name, tok in _tokenizers(tmp_path, texts).items():
        pieces = 0
        multi = 0
        for text in korean:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, (name, text)
            words = [t.removeprefix("##").removeprefix("▁") for t in tok.convert_ids_to_tokens(ids)]
            pieces += len(words)
            multi += sum(len(w) > 1 for w in words)
            # BERT's pre-tokenizer keeps no spaces: its decoder puts one between words, none before ". , ?"
            assert tok.decode(ids) == (text if name == "decoder" else " ".join(text.split())), (name, text)
        # about 4 in 5 pieces are whole words or syllable runs here; a vocabulary of characters would give 0
        assert multi > 0.6 * pieces, (name, multi, pieces)
        assert pieces < 0.5 * sum(len(t.replace(" ", "")) for t in korean), (name, pieces)


def test_merges_go_to_the_most_frequent_pair_then_the_smallest():
    from koret.synth import _train_bpe

    vocab, merges = _train_bpe({"cd": 2, "ab": 2, "ef": 3}, 100, ["<s>"])
    assert merges == [("e", "f"), ("a", "b"), ("c", "d")]
    assert list(vocab) == ["<s>", "a", "b", "c", "d", "e", "f", "ef", "ab", "cd"]
    # WordPiece: later characters carry "##"; ("##b", "##c") and ("a", "##b") tie, "##b" sorts first
    # every character is in the alphabet alone too ("b", "c": a word may start with them)
    vocab, merges = _train_bpe({"abc": 3}, 100, ["[UNK]"], prefix="##")
    assert merges == [("##b", "##c"), ("a", "##bc")]
    assert list(vocab) == ["[UNK]", "##b", "##c", "a", "b", "c", "##bc", "abc"]
    # the vocabulary stops at vocab_size, but keeps the whole alphabet
    assert list(_train_bpe({"abc": 3}, 7, ["[UNK]"], prefix="##")[0]) == ["[UNK]", "##b", "##c", "a", "b", "c",
                                                                          "##bc"]
    assert len(_train_bpe({"abcdef": 1}, 2, [])[0]) == 6


def _recounting_bpe(word_counts: dict[str, int], vocab_size: int, prefix: str) -> list[tuple[str, str]]:
    """The same merges, every pair recounted from scratch at each step (slow, obviously right)."""
    words = [[w[0]] + [prefix + c for c in w[1:]] for w in word_counts]
    vocab = {s for w in words for s in w} | {c for w in word_counts for c in w}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for w, f in zip(words, word_counts.values(), strict=True):
            for pair in pairwise(w):
                counts[pair] = counts.get(pair, 0) + f
        if not counts:
            break
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        merged = a + (b.removeprefix(prefix) if prefix else b)
        vocab.add(merged)
        for k, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if w[j:j + 2] == [a, b]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[k] = out
    return merges


def test_incremental_pair_counts_give_the_merges_of_recounting(pairs, extra_corpus):
    from tokenizers import normalizers, pre_tokenizers

    from koret.synth import _train_bpe, _word_counts

    texts = _corpus_for_tokenizer(pairs, extra_corpus)
    for pre, prefix in ((pre_tokenizers.BertPreTokenizer(), "##"), (pre_tokenizers.Metaspace(), "")):
        counts = _word_counts(texts, normalizers.NFC(), pre)
        vocab, merges = _train_bpe(counts, 900, [], prefix=prefix)
        assert len(vocab) == 900 and len(merges) > 300
        assert merges == _recounting_bpe(counts, 900, prefix)


def test_word_counts_are_those_of_whole_texts():
    """_word_counts pre-tokenizes each space-delimited piece once; the words are those of the whole texts."""
    from tokenizers import normalizers, pre_tokenizers

    from koret.synth import _word_counts

    texts = ["  두 칸 ", "query: ", "e \u0301x", "▁▁a b", " ▁x", "x\ty\nz  w", "(괄호) 안, 문장. 끝!", "", " ",
             "한글은 누가 만들었나?", "ᄒ\u1161ᆫ 글"]
    for pre in (pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace()):
        whole: dict[str, int] = {}
        for text in texts:
            for word, _ in pre.pre_tokenize_str(normalizers.NFC().normalize_str(text)):
                whole[word] = whole.get(word, 0) + 1
        assert _word_counts(texts, normalizers.NFC(), pre) == whole
