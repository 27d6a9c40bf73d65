"""Finding entity names and aliases in text: whole words, leftmost-longest, millions of names.

Text and names go through the same `normalize`: Unicode NFKD with accents dropped ("Beyoncé" ->
"beyonce"), apostrophes deleted ("McDonald's" -> "mcdonalds"), case folded, and every run of
other characters that are not letters or digits (punctuation, underscores, whitespace) made one
space. A phrase (a name or an alias) matches only whole words of the normalised text.

Matches are leftmost-longest and never overlap: scanning the words left to right, the first
word that starts a phrase takes the longest phrase starting there, and the scan resumes after
it ("new york city hall" with the phrases "new york", "new york city" and "city hall" gives
"new york city" only). A phrase shared by several entities (an ambiguous name or alias) gives
all of them: the teacher filter of python -m mlcd.annotate decides which, if any, is pictured.

`PhraseMatcher` is a token n-gram dictionary: {normalised phrase: entity id(s)} plus, per
word that starts a phrase, the phrase lengths (in words) that start with it, longest first.
A text of W words costs W dictionary look-ups plus one per phrase length tried at words that
start a phrase, whatever the size of the vocabulary; nothing is compiled per entity.
docs/annotation.md compares it with an Aho-Corasick automaton (pyahocorasick) on 2M names:
both match ~9k captions/s; the dictionary builds in half the time, in a fifth of the memory
(321 MB against 1.6 GB).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from mlcd.entities import EntityTable

_NOT_WORD = re.compile(r"[\W_]+")
_APOSTROPHES = str.maketrans("", "", "'\u2019\u02bc")


def normalize(text: str) -> str:
    """The words of `text` as matched (see the module docstring), joined by single spaces."""
    text = text.translate(_APOSTROPHES)
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
    return _NOT_WORD.sub(" ", text.casefold()).strip()


class PhraseMatcher:
    """Whole-word, leftmost-longest matching of a phrase vocabulary; phrase -> entity ids."""

    def __init__(self, phrases: Iterable[tuple[str, int]]):
        """phrases: (text, entity id) pairs; texts are normalised here. A phrase given for
        several ids maps to all of them (ascending); ValueError for a text without words."""
        table: dict[str, int | tuple[int, ...]] = {}
        lengths: dict[str, set[int]] = {}
        for text, entity_id in phrases:
            key = normalize(text)
            if not key:
                raise ValueError(f"entity {entity_id}: {text!r} has no words after normalising")
            entity_id = int(entity_id)
            # One int per phrase (the common case) costs far less memory than a tuple.
            got = table.get(key)
            if got is None:
                table[key] = entity_id
            elif isinstance(got, int):
                if got != entity_id:
                    table[key] = tuple(sorted((got, entity_id)))
            elif entity_id not in got:
                table[key] = tuple(sorted((*got, entity_id)))
            words = key.split(" ")
            lengths.setdefault(words[0], set()).add(len(words))
        self._table = table
        self._lengths = {w: tuple(sorted(n, reverse=True)) for w, n in lengths.items()}
        self.max_words = max((n[0] for n in self._lengths.values()), default=0)

    @classmethod
    def from_table(cls, table: EntityTable, aliases: bool = True) -> PhraseMatcher:
        """The names (and, if `aliases`, the aliases) of every entity of `table`."""

        def phrases():
            for k, entity_id in enumerate(table.ids.tolist()):
                yield table.names[k], entity_id
                if aliases:
                    for alias in table.aliases[k]:
                        yield alias, entity_id

        return cls(phrases())

    def __len__(self) -> int:
        """The number of distinct normalised phrases."""
        return len(self._table)

    def find(self, text: str) -> list[tuple[int, int, tuple[int, ...]]]:
        """[(first word, end word (exclusive), entity ids)] of the matches in the normalised
        `text`, left to right (leftmost-longest, non-overlapping)."""
        words = normalize(text).split()
        matches = []
        i, num_words = 0, len(words)
        while i < num_words:
            step = 1
            for n in self._lengths.get(words[i], ()):
                if i + n <= num_words:
                    ids = self._table.get(words[i] if n == 1 else " ".join(words[i : i + n]))
                    if ids is not None:
                        matches.append((i, i + n, (ids,) if isinstance(ids, int) else ids))
                        step = n
                        break
            i += step
        return matches

    def entities(self, text: str) -> list[int]:
        """The candidate entity ids of `text`: every id of every match, each once, in the
        order of first mention (an ambiguous phrase's ids ascending)."""
        seen: dict[int, None] = {}
        for _, _, ids in self.find(text):
            for entity_id in ids:
                seen.setdefault(entity_id, None)
        return list(seen)
