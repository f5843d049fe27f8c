"""Reading a split json: what ens's depth check adds to json.loads.

    .venv/bin/python -m benchmarks.json_read            # 500,000 images and annotations (~130 MB)
    .venv/bin/python -m benchmarks.json_read --quick    # 50,000 (~13 MB)

Every JSON ens reads goes through :func:`ensemble.formats.common.read_json`, which refuses a
document nested deeper than :data:`~ensemble.formats.common.MAX_JSON_DEPTH` levels. On a
generated iNat 2021-style split json (images with file name, size, licence, rights holder,
date and place; one annotation per image; 10,000 categories), measured in this one run and in
turns (best of ``--repeat``), as ratios to ``json.loads`` of the same bytes:

* the walk: the check as ens made it before, every parsed list and dict visited in Python;
* the text: :func:`ensemble.formats.common.json_depth`, the depth read off the bytes with
  numpy, as ens makes it now;
* ``read_json`` whole (the file read, json.loads and the check) against the file read and
  json.loads alone.

Two documents: *plain* (ASCII names, no escapes: the check's fast path) and *escapes* (a third
of the rights holders hold a quote, a backslash or accented letters, written with json.dumps's
``\\"``, ``\\\\`` and ``\\uXXXX`` escapes: every chunk takes the escape path).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from ensemble.formats.common import MAX_JSON_DEPTH, json_depth, read_json

PLAIN_NAMES = ["Ken-ichi Ueda", "Grant Van Horn", "Oisin Mac Aodha", "Scott Loarie", "Tony Iwane"]
ESCAPED_NAMES = ['Jos\u00e9 "Pepe" N\u00fa\u00f1ez', "C:\\photos\\owl [2]", "Fran\u00e7oise {M\u00fcller}"]


def make_split(count: int, escapes: bool, seed: int = 0) -> bytes:
    """An iNat 2021-style split json of ``count`` images, one annotation each, as UTF-8 bytes."""
    rng = random.Random(seed)
    names = PLAIN_NAMES + (ESCAPED_NAMES if escapes else [])
    weights = [2 / len(PLAIN_NAMES)] * len(PLAIN_NAMES)  # a third of the names escaped, if any
    weights += [1 / len(ESCAPED_NAMES)] * len(ESCAPED_NAMES) if escapes else []
    images = [{"id": i, "width": 800, "height": rng.randrange(400, 801),
               "file_name": f"train/{rng.randrange(10_000):05d}_Plantae/{rng.getrandbits(128):032x}.jpg",
               "license": f"http://creativecommons.org/licenses/by-nc/{rng.choice(['2.0', '4.0'])}/",
               "rights_holder": rng.choices(names, weights)[0], "date": "2018-05-24 12:03:00+00:00",
               "latitude": round(rng.uniform(-60, 70), 5), "longitude": round(rng.uniform(-180, 180), 5),
               "location_uncertainty": rng.randrange(5, 500)} for i in range(count)]
    annotations = [{"id": i, "image_id": i, "category_id": rng.randrange(10_000)} for i in range(count)]
    categories = [{"id": c, "name": f"Species {c}", "common_name": f"Plant {c}", "supercategory": "Plants",
                   "kingdom": "Plantae", "image_dir_name": f"{c:05d}_Plantae"} for c in range(10_000)]
    doc = {"info": {"year": 2021, "version": "2021"}, "images": images, "annotations": annotations,
           "categories": categories, "licenses": [{"id": k, "name": "CC BY-NC"} for k in range(6)]}
    return json.dumps(doc).encode()


def walk_deeper(value, limit: int) -> bool:
    """The check as ens made it before: every parsed list and dict visited, level by level."""
    containers = (list, dict)
    level, depth = ([value] if value.__class__ in containers else []), 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list = []
        add = below.extend
        for item in level:
            add([v for v in (item.values() if item.__class__ is dict else item) if v.__class__ in containers])
        level = below
    return False


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 images instead of 500,000")
    parser.add_argument("--repeat", type=int, default=3, help="turns of each; the best counts")
    args = parser.parse_args()
    count = 50_000 if args.quick else 500_000
    print(f"iNat 2021-style split json, {count:,} images and annotations; best of {args.repeat}, in turns\n")
    print(f"{'document':9} {'MB':>6} {'json.loads s':>12} {'walk s':>7} {'walk/loads':>10} {'text s':>7} "
          f"{'text/loads':>10} {'walk/text':>9} {'read_json/(read+loads)':>22}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, escapes in (("plain", False), ("escapes", True)):
            data = make_split(count, escapes)
            path = Path(tmp) / f"{label}.json"
            path.write_bytes(data)
            best = dict.fromkeys(("loads", "walk", "text", "read", "read_json"), float("inf"))
            for _ in range(args.repeat):
                seconds, value = timed(lambda: json.loads(data))
                best["loads"] = min(best["loads"], seconds)
                seconds, deeper = timed(lambda: walk_deeper(value, MAX_JSON_DEPTH))
                best["walk"] = min(best["walk"], seconds)
                seconds, depth = timed(lambda: json_depth(data))
                best["text"] = min(best["text"], seconds)
                assert depth == 3 and not deeper
                value = None  # free it before the next reads
                best["read"] = min(best["read"], timed(lambda: json.loads(path.read_bytes()))[0])
                best["read_json"] = min(best["read_json"], timed(lambda: read_json(path))[0])
            print(f"{label:9} {len(data) / 1e6:6.1f} {best['loads']:12.2f} {best['walk']:7.2f} "
                  f"{best['walk'] / best['loads']:+10.0%} {best['text']:7.3f} {best['text'] / best['loads']:+10.1%} "
                  f"{best['walk'] / best['text']:8.1f}x {best['read_json'] / best['read']:21.3f}x")


if __name__ == "__main__":
    main()
