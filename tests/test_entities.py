"""Entity tables (mlcd.entities) and the phrase matcher (mlcd.annotation.matcher): formats,
validation errors naming the file and entry, digests, subsets; normalisation, whole words,
leftmost-longest matches, aliases and ambiguous names."""

import json
import re

import numpy as np
import pytest

from input_pipeline.datasets import synthetic_scenes
from mlcd import entities
from mlcd.annotation.matcher import PhraseMatcher, normalize

ENTRIES = [
    {"id": 7, "name": "New York", "aliases": ["NYC", "the big apple"], "description": "a city"},
    {"id": 2, "name": "New York City Hall", "aliases": [], "description": ""},
    {"id": 3, "name": "Paris", "aliases": [], "description": "capital of France", "kind": "city"},
    {"id": 4, "name": "Paris", "aliases": ["Paris Hilton"], "description": "a person"},
]


def write(path, entries, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(e) + "\n" for e in entries)
        else:
            json.dump(entries, f, indent=2)
    return str(path)


def test_json_and_jsonl_load_the_same_table(tmp_path):
    a = entities.load_table(write(tmp_path / "a.json", ENTRIES))
    b = entities.load_table(write(tmp_path / "b.jsonl", ENTRIES[::-1], jsonl=True))
    assert a.ids.tolist() == b.ids.tolist() == [2, 3, 4, 7]  # sorted by id
    assert a.ids.dtype == np.int64 and len(a) == 4
    assert a.names == ["New York City Hall", "Paris", "Paris", "New York"]
    assert a.aliases[3] == ("NYC", "the big apple") and a.descriptions[0] == ""
    assert a.digest() == b.digest() and re.fullmatch("[0-9a-f]{64}", a.digest())
    assert a.entries() == b.entries()
    assert a.entry(1)["kind"] == "city"  # extra keys are kept
    # Key order and layout do not change the digest; any edit does, extra keys included.
    shuffled = [dict(reversed(list(e.items()))) for e in ENTRIES]
    assert entities.EntityTable(shuffled).digest() == a.digest()
    for key, value in (("description", "a town"), ("kind", "town"), ("aliases", ["x"])):
        edited = [dict(e) for e in ENTRIES]
        edited[2][key] = value
        assert entities.EntityTable(edited).digest() != a.digest(), key


def test_text_and_lookup():
    table = entities.EntityTable(ENTRIES)
    assert table.text(7) == "New York"
    assert table.text(7, with_description=True) == "New York: a city"
    assert table.text(2, with_description=True) == "New York City Hall"  # empty description
    assert table.row(7) == 3 and table.rows(np.array([4, 2])).tolist() == [2, 0]
    with pytest.raises(KeyError, match="no entity with id 5"):
        table.text(5)
    contiguous = entities.EntityTable([{**e, "id": i} for i, e in enumerate(ENTRIES)])
    assert contiguous.text(3) == "Paris" and contiguous.row(0) == 0
    with pytest.raises(KeyError, match="no entity with id 4"):
        contiguous.row(4)


def test_subset_renumbers_and_records_source_ids(tmp_path):
    table = entities.EntityTable(ENTRIES)
    sub = table.subset([4, 7])
    assert sub.ids.tolist() == [0, 1] and sub.names == ["Paris", "New York"]
    assert [sub.entry(k)["source_id"] for k in range(2)] == [4, 7]
    sub.save(str(tmp_path / "sub.json"))
    again = entities.load_table(str(tmp_path / "sub.json"))
    assert again.entries() == sub.entries() and again.digest() == sub.digest()
    assert again.text(1, True) == "New York: a city"


@pytest.mark.parametrize(
    "edit, message",
    [
        ({1: {"id": 7}}, r"entry 1 \(id 7\): duplicate id, also entry 0"),
        ({2: {"name": None}}, r"entry 2 \(id 3\): 'name' must be a string, got NoneType"),
        ({0: {"aliases": "NYC"}}, r"entry 0 \(id 7\): 'aliases' must be a list of strings"),
        ({0: {"aliases": ["ok", 3]}}, r"entry 0 \(id 7\): 'aliases' must be a list of strings"),
        ({3: {"id": True}}, r"entry 3 \(id True\): 'id' must be an integer, got bool"),
        ({3: {"id": "4"}}, r"entry 3 \(id '4'\): 'id' must be an integer, got str"),
        ({3: {"id": -1}}, r"entry 3 \(id -1\): 'id' must be in \[0, 2147483647\]"),
        ({1: {"name": "  --  "}}, r"entry 1 \(id 2\): 'name' '  --  ' has no letter or digit"),
        ({0: {"aliases": ["!"]}}, r"entry 0 \(id 7\): alias '!' has no letter or digit"),
        ({2: {"description": 1}}, r"entry 2 \(id 3\): 'description' must be a string"),
    ],
)
def test_invalid_entries_name_file_and_entry(tmp_path, edit, message):
    bad = [dict(e) for e in ENTRIES]
    for index, change in edit.items():
        bad[index].update(change)
    path = write(tmp_path / "table.json", bad)
    with pytest.raises(ValueError, match=re.escape(path) + ": " + message):
        entities.load_table(path)


def test_missing_fields_and_bad_files(tmp_path):
    missing = [dict(e) for e in ENTRIES]
    del missing[1]["aliases"]
    path = write(tmp_path / "m.jsonl", missing, jsonl=True)
    with pytest.raises(ValueError, match=rf"{path}: entry 1 \(id 2\): missing 'aliases'"):
        entities.load_table(path)
    no_id = [{"name": "x", "aliases": [], "description": ""}]
    path = write(tmp_path / "noid.json", no_id)
    with pytest.raises(ValueError, match=rf"{path}: entry 0: missing 'id'"):
        entities.load_table(path)
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ENTRIES[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=rf"{path}: line 2: invalid JSON Lines entry"):
        entities.load_table(str(path))
    path = tmp_path / "broken.json"
    path.write_text("[" + json.dumps(ENTRIES[0]) + ",")
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON"):
        entities.load_table(str(path))
    path = tmp_path / "list_of_lists.json"
    path.write_text("[[1, 2]]")
    with pytest.raises(ValueError, match=rf"{path}: entry 0: expected an object"):
        entities.load_table(str(path))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: the entity table is empty"):
        entities.load_table(str(tmp_path / "empty.json"))
    with pytest.raises(FileNotFoundError, match=r"entity table .*nope\.json does not exist"):
        entities.load_table(str(tmp_path / "nope.json"))


def test_synthetic_scenes_table_loads_with_aliases():
    table = entities.EntityTable(synthetic_scenes.entities(), "synthetic_scenes")
    assert len(table) == 48 and table.ids.tolist() == list(range(48))
    assert table.text(0) == "red circle" and table.aliases[0] == ("circle colored red",)
    assert (
        table.text(47, True) == "pink diamond: a square standing on one of its corners, solid pink."
    )
    matcher = PhraseMatcher.from_table(table)
    # The alias is the word order of one long-caption template.
    assert matcher.entities("One small circle, colored red. A large BLUE star.") == [0, 33]


# ----------------------------------------------------------------------------------------------
# The matcher.


def test_normalize():
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("Beyoncé's café_au-lait") == "beyonces cafe au lait"
    assert normalize("McDonald’s ﬁsh") == "mcdonalds fish"  # typographic apostrophe, ligature
    assert normalize("Straße 7/11") == "strasse 7 11"
    assert normalize("!?.") == ""


def test_whole_words_only():
    m = PhraseMatcher([("red circle", 1), ("cat", 2)])
    assert m.entities("a Red-Circle.") == [1]
    assert m.entities("red circles and a bigred circle, concatenate") == []
    assert m.entities("the CAT, the cat's toy") == [2]  # "cat's" normalises to "cats": no match


def test_leftmost_longest_non_overlapping():
    m = PhraseMatcher(
        [("new york", 1), ("new york city", 2), ("city hall", 3), ("york city hall", 4), ("a b", 5)]
    )
    # Longest at the leftmost start wins; the scan resumes after it (no "city hall", no 4).
    assert m.find("New York City Hall") == [(0, 3, (2,))]
    assert m.entities("new york city hall") == [2]
    # Punctuation is normalised away: it does not end a phrase.
    assert m.entities("in new york, city hall") == [2]
    assert m.entities("in new york; the city hall") == [1, 3]
    assert m.entities("york city hall") == [4]
    assert m.find("x new york y a b") == [(1, 3, (1,)), (4, 6, (5,))]
    assert m.max_words == 3 and len(m) == 5


def test_aliases_ambiguity_and_order_of_mention():
    table = entities.EntityTable(ENTRIES)
    m = PhraseMatcher.from_table(table)
    # "Paris" names two entities: both are candidates (ascending); ids once each, in order of
    # first mention; "paris hilton" (an alias of 4) is longer than "paris".
    assert m.entities("NYC and Paris, then the Big Apple and paris") == [7, 3, 4]
    assert m.entities("Paris Hilton in New York") == [4, 7]
    assert m.find("paris") == [(0, 1, (3, 4))]
    names_only = PhraseMatcher.from_table(table, aliases=False)
    assert names_only.entities("NYC, the big apple, Paris Hilton") == [3, 4]
    with pytest.raises(ValueError, match=r"entity 9: '\.\.\.' has no words"):
        PhraseMatcher([("...", 9)])
    # The same phrase twice for one entity (name == alias) stays one id.
    assert PhraseMatcher([("x y", 1), ("X-Y", 1)]).find("x y") == [(0, 2, (1,))]
