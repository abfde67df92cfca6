"""Fitting files into a token budget: the order in which views of files are offered (the bodies an issue
is about, by priority and file rank; then whole files and skeletons, source before tests and docs before
what the issue does not reach) and taking each that shows more and fits the room left; the token sizes
of views, counted once. It reads ranks (rank.py) and never ranks."""

from __future__ import annotations

import sqlite_utils

from ds4.agent.index.query import file_definitions
from ds4.agent.rank import Focus
from ds4.agent.tokens import TokenCounter
from ds4.agent.views import SKELETON, WHOLE, FileBlock, Part, View, join, skeleton

FOCUS_LEVELS = (("named", "traceback"), ("calls",), ("shares",))


class Sizer:
    """Texts and token counts of files as shown, counted once each."""

    def __init__(
        self, db: sqlite_utils.Database, text_of: dict[str, str], whole: dict[str, int], counter: TokenCounter
    ):
        self.db, self.text_of, self.whole, self.counter = db, text_of, whole, counter
        self._defs: dict[str, list] = {}
        self._tokens: dict[tuple[str, View], int] = {}

    def text(self, path: str, shown: View) -> str:
        if shown == WHOLE:
            return self.text_of[path]
        if path not in self._defs:
            self._defs[path] = file_definitions(self.db, path)
        return skeleton(self.text_of[path], self._defs[path], shown)

    def tokens(self, path: str, shown: View) -> int:
        if shown is None:
            return 0
        if shown == WHOLE:
            return self.whole[path]
        if (path, shown) not in self._tokens:
            self._tokens[path, shown] = self.counter.count(FileBlock(path, self.text(path, shown)).render())
        return self._tokens[path, shown]

    def worth(self, path: str, shown: View, current: View, room: int) -> bool:
        """Whether counting `shown` exactly is worth it: shorter than the whole file, and by a character
        estimate not far past the room left beside what `current` already takes."""
        if shown == WHOLE or shown is None:
            return True
        text, full = self.text(path, shown), self.text_of[path]
        estimate = self.whole[path] * len(text) / max(len(full), 1)
        return len(text) < len(full) and estimate <= 1.2 * room + self.tokens(path, current)


def steps(
    order: list[str],
    scores: dict[str, tuple[float, list[str]]],
    focuses: dict[str, Focus],
    whole_only: set[str],
    secondary: frozenset[str] = frozenset(),
) -> list[tuple[str, View]]:
    """The order in which content is offered: focused bodies by priority (named or traceback, callers,
    matching words) and file rank; then files in tiers, source the issue reaches (a score above 0), then
    the tests and docs (`secondary`) it reaches, then the files it does not reach: each tier's whole
    files by rank, then its skeletons by rank."""
    by_rank = sorted(order, key=lambda p: (-scores[p][0], p))
    offers: list[tuple[str, View]] = []
    for level in range(len(FOCUS_LEVELS)):
        for path in (p for p in by_rank if p in focuses):
            lines = [line for line, why in focuses[path].lines.items() if _level(why) == level]
            if lines:
                offers.append((path, Part(frozenset(lines), outline=False)))
    reached = [p for p in by_rank if scores[p][0] > 0]
    tiers = (
        [p for p in reached if p not in secondary],
        [p for p in reached if p in secondary],
        [p for p in by_rank if scores[p][0] <= 0],
    )
    for tier in tiers:
        offers += [(p, WHOLE) for p in tier]
        offers += [(p, SKELETON) for p in tier if p not in whole_only]
    return offers


def _level(why: str) -> int:
    return next(i for i, starts in enumerate(FOCUS_LEVELS) if why.startswith(starts))


def allocate(offers: list[tuple[str, View]], room: int, sizer: Sizer) -> dict[str, View]:
    """Each offer taken when it shows more of its file than before and the extra tokens fit the room."""
    shown: dict[str, View] = {path: None for path in sizer.text_of}
    for path, offer in offers:
        current, target = shown[path], join(shown[path], offer)
        if target == current or not sizer.worth(path, target, current, room):
            continue
        extra = sizer.tokens(path, target) - sizer.tokens(path, current)
        if extra <= room:
            shown[path], room = target, room - extra
    return shown
