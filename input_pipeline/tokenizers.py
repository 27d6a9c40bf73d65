"""Text tokenizers behind one interface: HuggingFace `tokenizer.json`, sentencepiece `.model` and
OpenAI CLIP's BPE merges file (`bpe_simple_vocab_16e6.txt.gz`, as shipped with open_clip).

`load_tokenizer(path)` picks the backend from the suffix. Every tokenizer exposes vocab_size,
pad_id, bos_id, eos_id and `encode(texts, context_length) -> int32 [N, L]` laid out as

    [BOS] t_1 ... t_k [EOS] [PAD] ... [PAD]

with the text truncated so that EOS is always the last real token (a text tower pooling at EOS
then always sees it). Backend-added special tokens (e.g. a post-processor in a tokenizer.json) are
not used: BOS/EOS are added here, identically for every backend.

Texts are cleaned before tokenizing by one of TEXT_CLEANERS (open_clip's cleaning functions):
'lower' by default for CLIP BPE (ids then equal open_clip.tokenize's), 'none' otherwise.

`train_bpe_tokenizer` trains the byte-level BPE used by the embedded dataset: special tokens
[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then the 256 byte symbols, then merges. Byte-level means any
string is encodable (no [UNK] in practice), while words seen in training become single tokens.
"""

import abc
import html
import os
import string
from collections.abc import Callable, Iterable, Sequence

import ftfy
import numpy as np
import sentencepiece
import tokenizers

from input_pipeline import clip_bpe

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
# Smallest vocabulary a trained BPE can have: the specials plus the 256 byte symbols.
BPE_BASE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Special-token spellings recognised in third-party tokenizer.json files (ours first, then
# sentencepiece/T5, CLIP/GPT-2 and BERT conventions).
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_BOS_NAMES = ("[BOS]", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("[EOS]", "</s>", "<eos>", "<|endoftext|>", "[SEP]")

# File suffix of each format: load_tokenizer dispatches on it and exports keep it.
_CLIP_BPE_SUFFIXES = (".txt.gz", ".txt")
_SUFFIXES = (".json", ".model", *_CLIP_BPE_SUFFIXES)

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def fix_text(text: str) -> str:
    """ftfy's repairs (mojibake, curly quotes, ligatures, full-width forms...), HTML entities
    decoded twice (scraped captions are often escaped twice), outer whitespace stripped."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_whitespace(text: str) -> str:
    """fix_text, then every whitespace run made one space."""
    return " ".join(fix_text(text).split())


def clean_lower(text: str) -> str:
    """clean_whitespace, lower-cased: what CLIP's BPE expects (its vocabulary is lower-case)."""
    return clean_whitespace(text).lower()


def canonicalize(text: str) -> str:
    """fix_text, '_' made a space, ASCII punctuation removed, lower-cased, whitespace runs made
    one space: big_vision's canonical text, which open_clip applies for SigLIP models."""
    text = fix_text(text).replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return " ".join(text.split())


def _unchanged(text: str) -> str:
    return text


TEXT_CLEANERS: dict[str, Callable[[str], str]] = {
    "none": _unchanged,
    "whitespace": clean_whitespace,
    "lower": clean_lower,
    "canonicalize": canonicalize,
}


class Tokenizer(abc.ABC):
    """Common interface. bos_id is None for models without a BOS token (then none is added);
    text_clean names the TEXT_CLEANERS entry applied to every text before tokenizing."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def __init__(self, text_clean: str):
        if text_clean not in TEXT_CLEANERS:
            raise ValueError(f"text_clean must be one of {list(TEXT_CLEANERS)}, got {text_clean!r}")
        self.text_clean = text_clean
        self._clean = TEXT_CLEANERS[text_clean]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each cleaned text, without any special token."""
        return self._tokenize([self._clean(text) for text in texts])

    @abc.abstractmethod
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (already cleaned), without any special token."""

    def encode(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """Returns int32 [len(texts), context_length]: BOS + tokens + EOS, then pad_id.

        Texts longer than context_length - 2 (- 1 without BOS) tokens are cut at the end and EOS
        still closes them, so every row contains exactly one EOS at its last real position.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a sequence of strings, got a single str")
        if context_length < 2:
            raise ValueError(
                f"context_length must be >= 2 (room for BOS/EOS), got {context_length}"
            )
        prefix = [] if self.bos_id is None else [self.bos_id]
        room = context_length - len(prefix) - 1
        out = np.full((len(texts), context_length), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(self.tokenize(list(texts))):
            seq = [*prefix, *ids[:room], self.eos_id]
            out[row, : len(seq)] = seq
        return out


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (e.g. loaded from tokenizer.json).

    pad/bos/eos are looked up by their usual spellings (_PAD_NAMES, ...). Without a pad token,
    pad_id = 0 (OpenAI CLIP's convention); without a BOS token none is added; without an EOS token
    the tokenizer is rejected, since EOS marks where a text ends.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        name: str = "<in-memory tokenizer>",
        text_clean: str = "none",
    ):
        super().__init__(text_clean)
        self._tok = tokenizer
        # Truncation/padding stored in a tokenizer.json would fight the layout made by encode().
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name = name
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        find = lambda names: next((vocab[n] for n in names if n in vocab), None)
        eos = find(_EOS_NAMES)
        if eos is None:
            raise ValueError(f"tokenizer {name} has no EOS token (looked for {_EOS_NAMES})")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos
        self.bos_id = find(_BOS_NAMES)
        pad = find(_PAD_NAMES)
        self.pad_id = 0 if pad is None else pad

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, None if absent."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer serialised as a tokenizer.json string."""
        return self._tok.to_str()


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`.

    Ids come from the model: pad_id() / bos_id() / eos_id() are -1 when the model was trained
    without them. Fallbacks: no pad -> pad_id 0 (sentencepiece's default <unk> slot; padded
    positions come after EOS and are masked or ignored by EOS pooling); no BOS -> none is added
    (e.g. T5 models); no EOS -> rejected. SigLIP's T5 c4_en model (pad 0, EOS 1, no BOS) thus
    gives big_vision's layout but for its padding with 1; Gemma's (SigLIP 2) BOS 2 is added here,
    not by big_vision.
    """

    def __init__(
        self, processor: sentencepiece.SentencePieceProcessor, name: str, text_clean: str = "none"
    ):
        super().__init__(text_clean)
        self._sp = processor
        self.name = name
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {name} defines no EOS id (eos_id = -1)")
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        return self._sp.decode(list(ids))


class ClipBpeTokenizer(Tokenizer):
    """OpenAI CLIP's BPE (see clip_bpe): BOS <|startoftext|>, EOS <|endoftext|>, pad_id 0.

    With the real merges file and the default 'lower' cleaning, encode(texts, 77) equals
    open_clip.tokenize(texts): open_clip's truncation (cut to 77, then EOT written over the last
    token) keeps the same first 75 tokens. One deliberate difference: open_clip turns the text
    '<end_of_text>' into EOT; here it is plain text, so a row has exactly one EOS.
    """

    def __init__(self, bpe: clip_bpe.ClipBpe, name: str, text_clean: str = "lower"):
        super().__init__(text_clean)
        self._bpe = bpe
        self.name = name
        self.vocab_size = len(bpe.tokens)
        self.bos_id, self.eos_id = bpe.sot_id, bpe.eot_id
        self.pad_id = 0  # OpenAI CLIP pads with 0, which is also the token '!'

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._bpe.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, BOS skipped and cut at the first EOS: in an encode() row padding
        follows EOS, and pad_id 0 is a real token."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._bpe.decode([i for i in ids if i != self.bos_id])


def _format_suffix(path: str) -> str:
    """The recognised suffix `path` ends with, else ValueError."""
    suffix = next((s for s in _SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise ValueError(
            f"unsupported tokenizer file {path!r}: expected a HuggingFace tokenizer.json (.json), "
            "a sentencepiece model (.model) or OpenAI CLIP's BPE merges file (.txt.gz or .txt, "
            "e.g. bpe_simple_vocab_16e6.txt.gz)"
        )
    return suffix


def tokenizer_file_name(path: str | os.PathLike) -> str:
    """Name for a copy of tokenizer file `path` that load_tokenizer reads the same way:
    'tokenizer' + its format's suffix, e.g. 'tokenizer.txt.gz' for bpe_simple_vocab_16e6.txt.gz."""
    return "tokenizer" + _format_suffix(os.fspath(path))


def load_tokenizer(path: str | os.PathLike, text_clean: str | None = None) -> Tokenizer:
    """Loads `path`: `.json` -> HuggingFace tokenizers, `.model` -> sentencepiece, `.txt.gz` or
    `.txt` -> OpenAI CLIP BPE merges. text_clean: a TEXT_CLEANERS name; None is 'lower' for CLIP
    BPE (open_clip's), 'none' for the others."""
    path = os.fspath(path)
    suffix = _format_suffix(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if suffix in _CLIP_BPE_SUFFIXES:
        bpe = clip_bpe.ClipBpe(clip_bpe.read_merges(path))
        return ClipBpeTokenizer(bpe, name=path, text_clean=text_clean or "lower")
    try:
        if suffix == ".json":
            backend = tokenizers.Tokenizer.from_file(path)
        else:
            backend = sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as e:  # tokenizers raises a bare Exception, sentencepiece OSError/RuntimeError
        raise ValueError(f"cannot load tokenizer {path}: {e}") from e
    if suffix == ".json":
        return HuggingFaceTokenizer(backend, name=path, text_clean=text_clean or "none")
    return SentencePieceTokenizer(backend, name=path, text_clean=text_clean or "none")


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2
) -> HuggingFaceTokenizer:
    """Trains a lower-casing byte-level BPE tokenizer on `texts`.

    vocab_size is an upper bound: training stops early when no pair occurs min_frequency times,
    which on a small closed grammar happens well below 1024. The result only depends on the
    multiset of texts (merges are ranked by count, ties broken by the pair itself).
    """
    if vocab_size <= BPE_BASE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must exceed {BPE_BASE_VOCAB_SIZE} (specials + 256 bytes), got {vocab_size}"
        )
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.NFKC(), tokenizers.normalizers.Lowercase()]
    )
    # add_prefix_space: a word gets the same token at the start of a text as in the middle.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HuggingFaceTokenizer(tok, name="<trained BPE>")
