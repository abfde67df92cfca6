"""Okapi BM25 over bags of words, and the words of code: identifiers whole and split into their parts
(snake_case, CamelCase), lowercased, short words and English stop words left out. It reads no index;
rank.py scores definition bodies with it."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable
from functools import lru_cache

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+")
STOP_WORDS = frozenset(
    "the and for with from this that these those not are was were when where into use uses used has have "
    "had but can its all any one should would could will now also only than then them they there their "
    "which what who how why does did done been being out via per our your you get set add fix".split()
)
K1, B = 1.2, 0.75
STEM = 6  # parts are cut to their first letters, a crude stemmer that needs no word list


def code_words(text: str) -> list[str]:
    """`text`'s identifiers, each whole and as its parts cut to STEM letters: "echo_via_pager" ->
    echo_via_pager, echo, via, pager; "deprecated" -> deprecated, deprec (words of three letters or more,
    stop words out)."""
    return [word for ident in IDENTIFIER.findall(text) for word in _split(ident)]


@lru_cache(maxsize=1 << 16)
def _split(ident: str) -> tuple[str, ...]:
    whole = ident.lower()
    parts = [p.lower()[:STEM] for p in PARTS.findall(ident)]  # "deprecation", "deprecated": "deprec"
    return tuple(
        w for w in dict.fromkeys([whole, *parts]) if len(w) >= 3 and w not in STOP_WORDS and w != "_" * len(w)
    )


def bm25(docs: dict[Hashable, Counter], query: set[str]) -> dict[Hashable, float]:
    """Each document's Okapi BM25 against the query's words; documents holding none are left out."""
    if not docs or not query:
        return {}
    lengths = {key: sum(d.values()) for key, d in docs.items()}
    average = sum(lengths.values()) / len(docs) or 1.0
    holding = Counter(w for d in docs.values() for w in query & d.keys())
    idf = {w: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for w, n in sorted(holding.items())}
    scores = {}
    for key, d in docs.items():
        norm = K1 * (1 - B + B * lengths[key] / average)
        score = sum(idf[w] * d[w] * (K1 + 1) / (d[w] + norm) for w in idf if w in d)  # in a fixed order
        if score > 0:
            scores[key] = score
    return scores
