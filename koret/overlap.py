"""Text near-duplicates of a query's positives: character n-gram overlap, a cheap guard against false negatives.

A passage that repeats a positive in another order, or with a sentence dropped, a few contractions or other
spacing, answers the query as well as the positive does; the teacher scores it close to the positive, but not
always above a score threshold (``filter.perc``) that also keeps hard true negatives. ``filter.max_overlap`` drops a
candidate whose text overlaps one of its query's positives by more than the threshold, whatever its score.

The measure is the overlap coefficient of character 3-gram sets, ``|C & P| / min(|C|, |P|)``, on the texts NFC
normalized, casefolded and with every whitespace removed (so spacing variations change nothing): the larger of
"the share of the candidate's 3-grams found in the positive" (containment; catches a copy with sentences dropped)
and "the share of the positive's 3-grams found in the candidate" (catches a copy with text added, which holds the
answer all the more). Reordering sentences keeps every 3-gram but the few across a sentence boundary, and
rewording a word changes only the 3-grams around it, so such copies stay near 1; Jaccard would fall with every
sentence dropped or added. Another passage on the same subject shares names and phrases, i.e. a small share of its
3-grams (about 0.1-0.4 on KorQuAD paragraphs of one article). Hangul 3-grams are three syllables: specific
enough that unrelated text rarely shares them, and no tokenizer (Kiwi) is needed.

Pure functions (numpy and the standard library); :func:`candidate_overlap` computes each distinct passage's
n-gram set once and intersects Python sets of strings, about a microsecond per 100 n-grams.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

NGRAM = 3
_SPACE = re.compile(r"\s+")


def squeeze(text: str) -> str:
    """The text as the overlap sees it: NFC, casefolded, every whitespace character removed."""
    return _SPACE.sub("", unicodedata.normalize("NFC", text).casefold())


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    """The set of character ``n``-grams of :func:`squeeze` (the text itself when shorter than ``n``)."""
    s = squeeze(text)
    if len(s) <= n:
        return frozenset([s]) if s else frozenset()
    return frozenset(s[i:i + n] for i in range(len(s) - n + 1))


def overlap(a: frozenset[str], b: frozenset[str]) -> float:
    """Overlap coefficient ``|a & b| / min(|a|, |b|)``; 0 when either is empty."""
    if not a or not b:
        return 0.0
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return len(small & large) / len(small)


def text_overlap(a: str, b: str, n: int = NGRAM) -> float:
    """:func:`overlap` of two texts' character n-grams."""
    return overlap(ngrams(a, n), ngrams(b, n))


def candidate_overlap(corpus: Sequence[str], positive_ids: Sequence[np.ndarray], candidate_ids: np.ndarray,
                      n: int = NGRAM) -> np.ndarray:
    """(Q, K) float32: each candidate's largest :func:`overlap` with one of its query's positives (passage indices
    into ``corpus``); 0 for padding (``candidate_ids < 0``). Each passage's n-grams are computed once."""
    ids = np.asarray(candidate_ids, dtype=np.int64)
    out = np.zeros(ids.shape, dtype=np.float32)
    cache: dict[int, frozenset[str]] = {}

    def grams(i: int) -> frozenset[str]:
        g = cache.get(i)
        if g is None:
            g = cache[i] = ngrams(corpus[i], n)
        return g

    for q, pids in enumerate(positive_ids):
        pos = [grams(int(p)) for p in np.asarray(pids).tolist()]
        row = out[q]
        for k, c in enumerate(ids[q].tolist()):
            if c >= 0:
                cg = grams(c)
                row[k] = max((overlap(cg, p) for p in pos), default=0.0)
    return out
