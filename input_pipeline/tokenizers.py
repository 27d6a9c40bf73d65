"""Text tokenizers behind one interface: HuggingFace `tokenizer.json` and sentencepiece `.model`.

`load_tokenizer(path)` picks the backend from the suffix. Every tokenizer exposes vocab_size,
pad_id, bos_id, eos_id and `encode(texts, context_length) -> int32 [N, L]` laid out as

    [BOS] t_1 ... t_k [EOS] [PAD] ... [PAD]

with the text truncated so that EOS is always the last real token (a text tower pooling at EOS
then always sees it). Backend-added special tokens (e.g. a post-processor in a tokenizer.json) are
not used: BOS/EOS are added here, identically for every backend.

`train_bpe_tokenizer` trains the byte-level BPE used by the embedded dataset: special tokens
[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then the 256 byte symbols, then merges. Byte-level means any
string is encodable (no [UNK] in practice), while words seen in training become single tokens.
"""

import abc
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece
import tokenizers

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
# Smallest vocabulary a trained BPE can have: the specials plus the 256 byte symbols.
BPE_BASE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Special-token spellings recognised in third-party tokenizer.json files (ours first, then
# sentencepiece/T5, CLIP/GPT-2 and BERT conventions).
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_BOS_NAMES = ("[BOS]", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("[EOS]", "</s>", "<eos>", "<|endoftext|>", "[SEP]")


class Tokenizer(abc.ABC):
    """Common interface. bos_id is None for models without a BOS token (then none is added)."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without any special token."""

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

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str = "<in-memory tokenizer>"):
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

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
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
    (e.g. T5 models); no EOS -> rejected.
    """

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, name: str):
        self._sp = processor
        self.name = name
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {name} defines no EOS id (eos_id = -1)")
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        return self._sp.decode(list(ids))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads `path`: `.json` -> HuggingFace tokenizers, `.model` -> sentencepiece."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1]
    if suffix not in (".json", ".model"):
        raise ValueError(
            f"unsupported tokenizer file {path!r}: expected a HuggingFace tokenizer.json (.json) "
            "or a sentencepiece model (.model)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        if suffix == ".json":
            backend = tokenizers.Tokenizer.from_file(path)
        else:
            backend = sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as e:  # tokenizers raises a bare Exception, sentencepiece OSError/RuntimeError
        raise ValueError(f"cannot load tokenizer {path}: {e}") from e
    if suffix == ".json":
        return HuggingFaceTokenizer(backend, name=path)
    return SentencePieceTokenizer(backend, name=path)


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
