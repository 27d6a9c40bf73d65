"""Tokenizers: BOS/EOS/pad layout, truncation, loading by suffix, sentencepiece fallbacks."""

import re

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers as hf

from input_pipeline.tokenizers import (
    SPECIAL_TOKENS,
    HuggingFaceTokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

CORPUS = [
    "a large red circle.",
    "there is a small blue star.",
    "the green square is medium.",
    "photo of a red object",
    "a circle.",
    "the yellow triangle sits in the top left.",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def bpe_path(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(bpe.to_json())
    return path


def _train_sentencepiece(prefix, **ids):
    text = prefix.parent / "corpus.txt"
    text.write_text("\n".join(CORPUS) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=60,
        hard_vocab_limit=False,
        model_type="unigram",
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return str(prefix) + ".model"


def _check_layout(tok, rows, texts, context_length):
    """Row = [BOS] ids[:room] [EOS] [PAD]..., against the tokenizer's own ids."""
    assert rows.dtype == np.int32 and rows.shape == (len(texts), context_length)
    prefix = [] if tok.bos_id is None else [tok.bos_id]
    room = context_length - len(prefix) - 1
    for row, ids in zip(rows, tok.tokenize(texts), strict=True):
        expect = [*prefix, *ids[:room], tok.eos_id]
        expect += [tok.pad_id] * (context_length - len(expect))
        np.testing.assert_array_equal(row, expect)


def test_trained_bpe_special_ids_and_words(bpe):
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert 260 < bpe.vocab_size <= 400
    # Frequent words become single tokens, the same at the start and inside a text, any case.
    ids = bpe.tokenize(["red circle", "a red circle", "A RED Circle"])
    assert len(ids[0]) == 2 and ids[1][1:] == ids[0] and ids[2] == ids[1]
    assert bpe.decode(bpe.encode(["a large red circle."], 16)[0]).strip() == "a large red circle."


def test_encode_layout_truncation_and_padding(bpe):
    texts = ["a circle.", "there is a small blue star. " * 5, ""]
    for length in (2, 3, 8, 40):
        rows = bpe.encode(texts, length)
        _check_layout(bpe, rows, texts, length)
        for row in rows:  # exactly one EOS, and it is the last non-pad token
            (eos,) = np.flatnonzero(row == bpe.eos_id)
            assert row[0] == bpe.bos_id and (row[eos + 1 :] == bpe.pad_id).all()
    assert bpe.encode(["a circle."], 2).tolist() == [[bpe.bos_id, bpe.eos_id]]
    assert bpe.encode([], 5).shape == (0, 5)


def test_encode_rejects_bad_arguments(bpe):
    with pytest.raises(ValueError, match="context_length"):
        bpe.encode(["a"], 1)
    with pytest.raises(TypeError, match="single str"):
        bpe.encode("a circle", 8)


def test_training_is_deterministic_and_validates_vocab(bpe):
    assert train_bpe_tokenizer(CORPUS, vocab_size=400).to_json() == bpe.to_json()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_load_json_round_trip(bpe, bpe_path):
    tok = load_tokenizer(bpe_path)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (
        bpe.vocab_size,
        bpe.pad_id,
        bpe.bos_id,
        bpe.eos_id,
    )
    np.testing.assert_array_equal(tok.encode(CORPUS[:6], 12), bpe.encode(CORPUS[:6], 12))


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.*\.json.*\.model"):
        load_tokenizer(vocab)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load_tokenizer(broken)
    broken_sp = tmp_path / "broken.model"
    broken_sp.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=re.escape(str(broken_sp))):
        load_tokenizer(broken_sp)


def test_third_party_json_uses_its_special_tokens_and_ignores_its_post_processor(tmp_path):
    """A CLIP-style tokenizer.json: <|startoftext|>/<|endoftext|>, no pad token, a post-processor
    that adds the specials itself and stored padding/truncation. encode() adds BOS/EOS once."""
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "red": 3, "circle": 4, "<unk>": 5}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.post_processor = hf.processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)],
    )
    tok.enable_padding(length=20)
    tok.enable_truncation(max_length=3)
    path = tmp_path / "clip_tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.encode(["red circle red"], 6).tolist() == [[1, 3, 4, 3, 2, 0]]


def test_json_without_eos_is_rejected():
    tok = hf.Tokenizer(hf.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="EOS"):
        HuggingFaceTokenizer(tok, name="no_eos.json")


def test_sentencepiece_default_ids_pad_fallback(tmp_path):
    path = _train_sentencepiece(tmp_path / "sp")  # defaults: unk 0, bos 1, eos 2, pad -1
    tok = load_tokenizer(path)
    proc = spm.SentencePieceProcessor(model_file=path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.vocab_size == proc.get_piece_size()
    texts = ["a large red circle.", "the yellow triangle sits in the top left."]
    assert tok.tokenize(texts) == proc.encode(texts)
    for length in (2, 5, 30):
        _check_layout(tok, tok.encode(texts, length), texts, length)


def test_sentencepiece_explicit_pad_and_missing_bos(tmp_path):
    path = _train_sentencepiece(tmp_path / "t5", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tok = load_tokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
    rows = tok.encode(["a circle.", "there is a small blue star."], 6)
    _check_layout(tok, rows, ["a circle.", "there is a small blue star."], 6)
    assert rows[0, 0] != 1  # no BOS: the row starts with the text


def test_sentencepiece_without_eos_is_rejected(tmp_path):
    path = _train_sentencepiece(tmp_path / "noeos", eos_id=-1)
    with pytest.raises(ValueError, match="EOS"):
        load_tokenizer(path)
