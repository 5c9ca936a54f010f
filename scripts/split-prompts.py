#!/usr/bin/env python3
"""A prompts CSV for `cxrgen generate --prompts-file` drawn from a prepared cache's split.

    scripts/split-prompts.py CACHE [--split test] [--n 200] [--seed 0] > prompts.csv

Draws N reports of the split at random (seeded, without replacement) and writes one row per
distinct text they have, `n` the number of draws with that text, `seed` far enough apart that no
two rows share a seed. The images are then in the split's own proportions of texts (and labels),
which `cxrgen eval generation --images` needs to judge a model on a mixed split: the cache lists
its reports grouped by collection, so `eval generation --n` (the first N in cache order) would
see one collection only. Standard library only.
"""
import argparse
import collections
import csv
import json
import pathlib
import random
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=pathlib.Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    records = args.cache / "records.jsonl"
    if not records.is_file():
        print(f"split-prompts: {records}: not found (is {args.cache} a prepared cache?)", file=sys.stderr)
        return 2
    texts = []
    with records.open() as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"split-prompts: {records}:{i}: {e}", file=sys.stderr)
                return 2
            if r.get("split") == args.split:
                texts.append(r["text"])
    if not texts:
        print(f"split-prompts: {records}: no report in split '{args.split}'", file=sys.stderr)
        return 2
    if not 0 < args.n <= len(texts):
        print(f"split-prompts: --n {args.n}: the split '{args.split}' has {len(texts)} reports", file=sys.stderr)
        return 2
    drawn = collections.Counter(random.Random(args.seed).sample(texts, args.n))
    out = csv.writer(sys.stdout)
    out.writerow(["prompt", "n", "seed"])
    # Rows in order of first appearance in the cache, so the file does not depend on the hashing.
    seen = []
    for t in texts:
        if t in drawn and t not in seen:
            seen.append(t)
    for row, t in enumerate(seen):
        out.writerow([t, drawn[t], row * 100_000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
