"""OpenAI CLIP's byte-level BPE, read from the merges file that OpenAI CLIP and open_clip ship
(`bpe_simple_vocab_16e6.txt.gz`), giving the same token ids as open_clip's tokenizer.

The file: a header line containing '#version:', then one merge per line, 'left right', in the
order they were learned. CLIP uses the first 48,894 merges (MAX_MERGES). Vocabulary, in id order:

    the 256 byte symbols | the same + END_OF_WORD | one token per merge (left + right) | SOT, EOT

i.e. 49,408 ids with SOT = 49406 and EOT = 49407 for the real file.

Text -> ids (`ClipBpe.encode`, on text already cleaned: see `tokenizers.clean_lower`): the text is
split into words by WORD_PATTERN; a word's UTF-8 bytes are written as byte symbols (one printable
character per byte), END_OF_WORD is attached to the last one, and adjacent symbols are merged,
lowest merge rank first (every occurrence of that pair, left to right), until no adjacent pair is
a merge. Every byte has a symbol, so any text is encodable (unseen characters fall back to their
bytes).
"""

import gzip
import itertools
from collections.abc import Sequence

import regex

# CLIP's vocabulary size (49,408) minus the 2 * 256 byte symbols and the 2 special tokens.
MAX_MERGES = 48_894
END_OF_WORD = "</w>"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

# Contractions, runs of letters, single digits, runs of anything else but whitespace.
# IGNORECASE matters even on lower-cased text: case folding lets "'ſ" (long s) match "'s".
# Special-token spellings in the text are not matched (open_clip does match '<end_of_text>'):
# every encoded row then has exactly one EOS, where encode() puts it.
WORD_PATTERN = regex.compile(
    r"'(?:s|t|re|ve|m|ll|d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)

# Bytes that are printable, non-space Latin-1 characters stand for themselves.
_SELF_BYTES = (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))


def byte_symbols() -> tuple[list[str], list[int]]:
    """(symbol of each byte value, byte values in vocabulary order).

    The _SELF_BYTES come first, as themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen) follow in byte order as chr(256), chr(257), ...: so no symbol is whitespace (the
    merges file separates symbols by spaces) or a control character.
    """
    others = [b for b in range(256) if b not in _SELF_BYTES]
    symbol = [chr(b) for b in range(256)]
    for k, b in enumerate(others):
        symbol[b] = chr(256 + k)
    return symbol, [*_SELF_BYTES, *others]


def read_merges(path: str, max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    """The first `max_merges` merges of a CLIP merges file (gzip-compressed or plain UTF-8).

    Raises ValueError naming `path` when it is not such a file: no '#version:' header, a line
    that is not two symbols, or a symbol that is neither a byte symbol (optionally +
    END_OF_WORD) nor the result of an earlier merge, i.e. a merge BPE could never apply.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        if data[:2] == b"\x1f\x8b":  # gzip magic
            data = gzip.decompress(data)
        lines = data.decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a CLIP BPE merges file: {e}") from e
    if "#version:" not in lines[0]:
        raise ValueError(
            f"{path} is not a CLIP BPE merges file: its first line is not a '#version: ...' "
            f"header (got {lines[0][:60]!r})"
        )
    symbols, _ = byte_symbols()
    known = {*symbols, *(s + END_OF_WORD for s in symbols)}
    merges = []
    for number, line in enumerate(lines[1 : max_merges + 1], start=2):
        parts = line.split()
        if not parts and number == len(lines):  # the newline ending the file
            break
        if len(parts) != 2 or not all(p in known for p in parts):
            raise ValueError(
                f"{path} is not a CLIP BPE merges file: line {number} ({line[:60]!r}) is not "
                "two known symbols 'left right'"
            )
        merges.append((parts[0], parts[1]))
        known.add(parts[0] + parts[1])
    return merges


class ClipBpe:
    """Byte-level BPE over `merges` (as read by read_merges), with a per-word cache.

    `tokens[i]` is the string of id i; sot_id / eot_id are the two special tokens. The cache
    maps a word to its ids; it is emptied when it reaches `cache_size` words, which bounds its
    memory on an open-ended caption stream while frequent words are cached again at once.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], cache_size: int = 100_000):
        self._symbol, order = byte_symbols()
        base = [self._symbol[b] for b in order]
        self.tokens = [
            *base,
            *(s + END_OF_WORD for s in base),
            *(left + right for left, right in merges),
            START_OF_TEXT,
            END_OF_TEXT,
        ]
        # A string made by two merges keeps the later id, as open_clip's dict does.
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._no_merge = len(merges)
        self.sot_id, self.eot_id = len(self.tokens) - 2, len(self.tokens) - 1
        # str.translate table from a byte (as the Latin-1 character of that value) to its symbol.
        self._to_symbols = {b: s for b, s in enumerate(self._symbol) if chr(b) != s}
        self._from_symbol = {s: b for b, s in enumerate(self._symbol)}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special token; no cleaning: the caller cleans)."""
        ids = []
        for word in WORD_PATTERN.findall(text):
            word_ids = self._cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(self._cache) >= self._cache_size:
                    self._cache.clear()
                self._cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _rank(self, pair: tuple[str, str]) -> int:
        """Merge rank of `pair`; pairs that are not merges rank after every merge."""
        return self._ranks.get(pair, self._no_merge)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one word: its byte symbols, END_OF_WORD on the last, merged by rank."""
        chars = word.encode("utf-8").decode("latin-1").translate(self._to_symbols)
        parts = [*chars[:-1], chars[-1] + END_OF_WORD]
        while len(parts) > 1:
            pair = min(itertools.pairwise(parts), key=self._rank)
            if pair not in self._ranks:  # no adjacent pair is a merge
                break
            left, right = pair
            merged, i = [], 0
            while i < len(parts):
                if parts[i] == left and i + 1 < len(parts) and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._ids[p] for p in parts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (plain tokens only): words separated by one space, bytes that do not
        form valid UTF-8 (a cut multi-byte character) replaced by U+FFFD."""
        out = bytearray()
        for i in ids:
            token = self.tokens[i]
            word_end = token.endswith(END_OF_WORD)
            out += bytes(self._from_symbol[c] for c in token.removesuffix(END_OF_WORD))
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").rstrip(" ")
