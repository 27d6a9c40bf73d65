"""Entity matching at MOFI's vocabulary size: PhraseMatcher against an Aho-Corasick automaton.

    python bench/annotate.py [--entities 2000000] [--captions 20000] [--repeats 3]

Vocabulary (seeded): 60,000 random pseudo-words; each of --entities entities gets a name of
1-4 of them (10 / 50 / 30 / 10 %), a quarter also one alias of 2-3 words; short names repeat,
so some phrases are ambiguous, as in a real knowledge base. Captions: 20 random words with 0-3
names or aliases inserted, in mixed case with punctuation, so normalisation does real work.

Each matcher is built and timed in a fresh process (so its memory is measured alone):
- PhraseMatcher (mlcd/annotation/matcher.py): the token n-gram dictionary python -m
  mlcd.annotate uses;
- Aho-Corasick (pyahocorasick, `pip install pyahocorasick`; skipped if missing): the same
  phrases, words separated by two spaces in keys and text (" new  york ") so that a match
  starts and ends on word boundaries, every match reported, then the leftmost-longest
  non-overlapping ones kept, ids per phrase in the same int-or-tuple form.
Both must give the same candidates for every caption (checked). Reported: build time, memory
(growth of the process's resident set while building, after gc), captions/s (best of
--repeats passes, normalisation included, one thread), and the time and memory of
mlcd.entities.load_table on the same table written as JSONL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.machine import cpu_model
from mlcd.annotation.matcher import PhraseMatcher, normalize
from mlcd.entities import load_table

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vocabulary(num_entities: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """(names, aliases) of the synthetic entities (module docstring)."""
    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(_LETTERS, rng.integers(3, 10))) for _ in range(60_000)})
    lengths = rng.choice([1, 2, 3, 4], size=num_entities, p=[0.1, 0.5, 0.3, 0.1])
    picks = rng.integers(len(words), size=(num_entities, 4))
    names = [" ".join(words[j] for j in picks[i, : lengths[i]]) for i in range(num_entities)]
    has_alias = rng.random(num_entities) < 0.25
    alias_len = rng.integers(2, 4, size=num_entities)
    alias_picks = rng.integers(len(words), size=(num_entities, 3))
    aliases = [
        [" ".join(words[j] for j in alias_picks[i, : alias_len[i]])] if has_alias[i] else []
        for i in range(num_entities)
    ]
    return names, aliases


def captions(names: list[str], aliases: list[list[str]], count: int, seed: int = 1) -> list[str]:
    """Random word captions with names / aliases inserted, in mixed case with punctuation."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for n in names[:50_000] for w in n.split()})
    out = []
    for _ in range(count):
        text = [vocab[j] for j in rng.integers(len(vocab), size=20)]
        for _ in range(rng.integers(0, 4)):
            e = int(rng.integers(len(names)))
            phrase = aliases[e][0] if aliases[e] and rng.random() < 0.5 else names[e]
            text.insert(int(rng.integers(len(text) + 1)), phrase.title() + ",")
        out.append(" ".join(text) + "!")
    return out


def phrases(names: list[str], aliases: list[list[str]]):
    for entity_id, (name, more) in enumerate(zip(names, aliases, strict=True)):
        yield name, entity_id
        for alias in more:
            yield alias, entity_id


class AhoCorasickMatcher:
    """The reference: PhraseMatcher's semantics on a pyahocorasick automaton."""

    def __init__(self, pairs):
        import ahocorasick

        ids: dict[str, int | tuple[int, ...]] = {}
        for text, entity_id in pairs:
            key = " " + "  ".join(normalize(text).split()) + " "
            got = ids.get(key)
            if got is None:
                ids[key] = entity_id
            elif isinstance(got, int):
                ids[key] = got if got == entity_id else tuple(sorted((got, entity_id)))
            elif entity_id not in got:
                ids[key] = tuple(sorted((*got, entity_id)))
        self._automaton = ahocorasick.Automaton()
        for key, value in ids.items():
            self._automaton.add_word(key, (len(key), value))
        self._automaton.make_automaton()

    def entities(self, text: str) -> list[int]:
        padded = " " + "  ".join(normalize(text).split()) + " "
        found = [(end - n + 1, -n, v) for end, (n, v) in self._automaton.iter(padded)]
        found.sort(key=lambda m: m[:2])
        seen: dict[int, None] = {}
        last_end = -1
        for start, neg_len, value in found:  # leftmost first, longest first at a start
            if start > last_end:
                last_end = start - neg_len - 1
                for entity_id in (value,) if isinstance(value, int) else value:
                    seen.setdefault(entity_id, None)
        return list(seen)


def worker(kind: str, num_entities: int, num_captions: int, repeats: int, out: str) -> None:
    """Builds one matcher (or loads the table), times it; writes a JSON result to `out`."""
    names, aliases = vocabulary(num_entities)
    texts = captions(names, aliases, num_captions)
    result: dict = {"kind": kind}
    if kind == "load_table":
        path = out + ".jsonl"
        with open(path, "w") as f:
            for i, (name, more) in enumerate(zip(names, aliases, strict=True)):
                entry = {"id": i, "name": name, "aliases": more, "description": f"entity {i}"}
                f.write(json.dumps(entry) + "\n")
        del names, aliases
        gc.collect()
        before, start = rss_mb(), time.perf_counter()
        table = load_table(path)
        result["build_s"] = time.perf_counter() - start
        gc.collect()
        result["memory_mb"] = rss_mb() - before
        result["phrases"] = len(table)
        os.remove(path)
    else:
        gc.collect()
        before, start = rss_mb(), time.perf_counter()
        if kind == "PhraseMatcher":
            matcher = PhraseMatcher(phrases(names, aliases))
        else:
            matcher = AhoCorasickMatcher(phrases(names, aliases))
        result["build_s"] = time.perf_counter() - start
        gc.collect()
        result["memory_mb"] = rss_mb() - before
        result["phrases"] = len(matcher) if kind == "PhraseMatcher" else None
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            found = [matcher.entities(t) for t in texts]
            best = min(best, time.perf_counter() - start)
        result["captions_per_s"] = len(texts) / best
        result["words_per_s"] = sum(len(normalize(t).split()) for t in texts) / best
        result["candidates"] = found
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=2_000_000)
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.entities, args.captions, args.repeats, args.out)
        return
    try:
        import ahocorasick  # noqa: F401

        kinds = ["PhraseMatcher", "Aho-Corasick", "load_table"]
    except ImportError:
        print("pyahocorasick is not installed: only PhraseMatcher is measured")
        kinds = ["PhraseMatcher", "load_table"]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.entities:,} entities, {args.captions:,} captions, best of {args.repeats}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            out = os.path.join(tmp, kind + ".json")
            cmd = [sys.executable, __file__, "--worker", kind, "--out", out]
            cmd += ["--entities", str(args.entities), "--captions", str(args.captions)]
            subprocess.run([*cmd, "--repeats", str(args.repeats)], check=True)
            with open(out) as f:
                results.append(json.load(f))
    matchers = [r for r in results if r["kind"] != "load_table"]
    for r in matchers[1:]:
        if r["candidates"] != matchers[0]["candidates"]:
            raise SystemExit(f"{r['kind']} and {matchers[0]['kind']} disagree on some captions")
    num = sum(len(c) for c in matchers[0]["candidates"])
    print(f"phrases: {matchers[0]['phrases']:,}; candidates found: {num:,} (all matchers agree)")
    print()
    print("| what | build / load (s) | memory (MB) | captions/s | words/s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        speed = (
            f"{r['captions_per_s']:,.0f} | {r['words_per_s']:,.0f}"
            if "captions_per_s" in r
            else "- | -"
        )
        print(f"| {r['kind']} | {r['build_s']:.1f} | {r['memory_mb']:,.0f} | {speed} |")


if __name__ == "__main__":
    main()
