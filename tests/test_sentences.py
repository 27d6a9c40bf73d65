"""input_pipeline.sentences: sentence splitting, merging and sub-caption draws (DreamLIP)."""

import itertools

import numpy as np
import pytest

from input_pipeline import sentences
from input_pipeline.datasets import synthetic_scenes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A red circle. A blue star.", ["A red circle.", "A blue star."]),
        ("Look! Is it big? Yes.", ["Look!", "Is it big?", "Yes."]),
        ("no end mark", ["no end mark"]),
        ("first line\nsecond line", ["first line", "second line"]),
        ("one.\n\ntwo\r\nthree", ["one.", "two", "three"]),
        ("It is 3.5 cm wide. Pi is 3.14!", ["It is 3.5 cm wide.", "Pi is 3.14!"]),
        ("Wait.. then  it  moved.   ", ["Wait..", "then  it  moved."]),
        ("A cat. . A dog. ...", ["A cat.", "A dog."]),  # pieces of only end marks dropped
        ("Really?! Yes", ["Really?!", "Yes"]),
        ("  \n\t \n ", []),
        ("", []),
        ("Dr. Smith smiles.", ["Dr.", "Smith smiles."]),  # abbreviations are not handled
    ],
)
def test_split_sentences_known_cases(text, expected):
    assert sentences.split_sentences(text) == expected


def test_split_sentences_agrees_with_synthetic_scenes():
    for i in range(300):
        caption = synthetic_scenes.generate_example(0, "test", i, 32)["long_caption"]
        expected = synthetic_scenes.split_sentences(caption)
        assert sentences.split_sentences(caption) == expected, caption
        assert len(expected) >= 2  # one sentence per object plus the background


def test_merge_sentences():
    s = ["a.", "b.", "c.", "d.", "e."]
    assert sentences.merge_sentences(s, 1) == s
    assert sentences.merge_sentences(s, 2) == ["a. b.", "c. d.", "e."]
    assert sentences.merge_sentences(s, 5) == ["a. b. c. d. e."]
    assert sentences.merge_sentences(s, 9) == ["a. b. c. d. e."]
    assert sentences.merge_sentences([], 3) == []
    with pytest.raises(ValueError, match=r"m must be >= 1 .* got m=0"):
        sentences.merge_sentences(s, 0)


POOL = ["short", "s1.", "s2.", "s3.", "s4.", "s5."]


def test_draw_without_replacement_covers_the_pool():
    counts = dict.fromkeys(POOL, 0)
    subsets = set()
    for seed in range(200):
        texts, mask = sentences.draw_subcaptions(POOL, 3, np.random.default_rng(seed))
        assert len(texts) == 3 and mask.dtype == bool and mask.tolist() == [True] * 3
        assert len(set(texts)) == 3 and set(texts) <= set(POOL)
        subsets.add(frozenset(texts))
        for t in texts:
            counts[t] += 1
    # 200 draws x 3 of 6 items: each item ~100 times; the bounds are ~6 standard deviations.
    assert all(60 < c < 140 for c in counts.values()), counts
    assert len(subsets) == 20  # every 3-subset of 6 (C(6, 3)) occurs


def test_draw_order_is_random():
    orders = {
        tuple(sentences.draw_subcaptions(POOL[:3], 3, np.random.default_rng(seed))[0])
        for seed in range(100)
    }
    assert orders == set(itertools.permutations(POOL[:3]))


def test_draw_pads_a_small_pool():
    texts, mask = sentences.draw_subcaptions(["a", "b"], 4, np.random.default_rng(0))
    assert sorted(texts[:2]) == ["a", "b"] and texts[2:] == ["", ""]
    np.testing.assert_array_equal(mask, [True, True, False, False])
    firsts = {
        sentences.draw_subcaptions(["a", "b"], 4, np.random.default_rng(s))[0][0] for s in range(20)
    }
    assert firsts == {"a", "b"}  # the pool's order is shuffled too
    texts, mask = sentences.draw_subcaptions([], 2, np.random.default_rng(0))
    assert texts == ["", ""] and not mask.any()
    with pytest.raises(ValueError, match=r"k must be >= 1 .* got k=0"):
        sentences.draw_subcaptions(POOL, 0, np.random.default_rng(0))


def test_subcaption_rng_depends_only_on_seed_index_epoch():
    def draw(seed, index, epoch):
        return sentences.draw_subcaptions(POOL, 3, sentences.subcaption_rng(seed, index, epoch))[0]

    assert draw(0, 7, 1) == draw(0, 7, 1)
    assert draw(np.int64(0), np.int64(7), 1) == draw(0, 7, 1)  # numpy ints from a batch
    # Another epoch, example or seed draws afresh (30 epochs: some draws must differ).
    assert len({tuple(draw(0, 7, e)) for e in range(30)}) > 10
    assert len({tuple(draw(0, i, 0)) for i in range(30)}) > 10
    assert len({tuple(draw(s, 7, 0)) for s in range(30)}) > 10
    # The tag keeps it apart from the plain [seed, index, epoch] stream.
    plain = np.random.default_rng([0, 7, 1]).random()
    assert sentences.subcaption_rng(0, 7, 1).random() != plain
    with pytest.raises(ValueError, match=r"epoch must be >= 0; got epoch=-1"):
        sentences.subcaption_rng(0, 7, -1)
