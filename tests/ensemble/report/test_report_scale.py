"""`ens report` at scale: its peak resident memory follows --memory, not the stores' size, and
the page's numbers do not depend on the block size.

:func:`make_blend` writes a blend folder of any shape without `ens infer` or `ens blend`: stores
through the real :class:`~ensemble.formats.store.StoreWriter` (synthetic members correlated with
each other, a true class per row), the val json they were made from, a training json and a
blend.json recording the stores' sha256 as `ens blend` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble import __version__
from ensemble.fileio import sha256_file
from ensemble.formats.blend import (BlendRecord, CvRow, CvTable, ModelProvenance, PriorCorrection, SplitStores,
                                    store_digest)
from ensemble.formats.store import StoreWriter, read_store
from tests.ensemble.inference.test_store import BASE
from tests.rss import measure

#: Rows written per store chunk by :func:`make_blend`.
_CHUNK = 4096


def _labels(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(rows) % classes)


def make_blend(root: Path, models: int = 2, rows: int = 1000, classes: int = 50, dtype: str = "float16",
               views: bool = False, temperatures: bool = True, prior: bool = True, seed: int = 0) -> Path:
    """A work folder under ``root`` (``data/``, ``runs/``, ``blends/b``) with a fitted blend of
    ``models`` stores of ``rows`` x ``classes`` on val; returns the blend folder."""
    data, runs = root / "data", root / "runs"
    data.mkdir(parents=True)
    labels = _labels(rows, classes, seed)
    ids = list(range(rows))
    categories = [{"id": c, "name": f"species {c}"} for c in range(classes)]
    val_json = data / "val2019.json"
    val_json.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"val/{i}.jpg"} for i in ids],
        "annotations": [{"id": i, "image_id": i, "category_id": int(c)} for i, c in zip(ids, labels)],
        "categories": categories}))
    rng = np.random.default_rng(seed + 1)
    counts = np.maximum(1, (200 * np.arange(1, classes + 1, dtype=float) ** -0.8).astype(int))
    train = [{"id": k, "image_id": k, "category_id": int(c)}
             for k, c in enumerate(np.repeat(np.arange(classes), counts))]
    (data / "train2019.json").write_text(json.dumps({"images": [], "annotations": train, "categories": categories}))
    val_sha = sha256_file(val_json)
    view_names = ("identity", "flip") if views else ("identity",)
    manifest = dataclasses.replace(
        BASE, dataset=dataclasses.replace(BASE.dataset, source=str(val_json), sha256=val_sha, images=rows),
        tta=dataclasses.replace(BASE.tta, views=view_names))
    names = [f"m{i}" for i in range(models)]
    stores = []
    for m, name in enumerate(names):
        key = {"model_sha256": f"{m}" * 64, "dataset_sha256": val_sha, "dtype": dtype}
        writer = StoreWriter(runs / name / "val", key, rows=rows, chunk_size=_CHUNK)
        model_manifest = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model, sha256=f"{m}" * 64))
        writer.open(model_manifest)
        for c in range(writer.chunks):
            lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, rows)
            shared = rng.standard_normal((hi - lo, classes), dtype=np.float32)
            logits = shared * (1.0 + 0.3 * m) + rng.standard_normal((hi - lo, classes), dtype=np.float32)
            logits[np.arange(hi - lo), labels[lo:hi]] += 2.0 + m
            per_view = None
            if views:
                per_view = np.stack([logits + 0.1 * rng.standard_normal((hi - lo, classes), dtype=np.float32)
                                     for _ in view_names])
            writer.write_chunk(c, logits, np.ones(hi - lo, bool), (), per_view)
            del shared, logits, per_view
        writer.finish(ids, tuple(f"val/{i}.jpg" for i in ids), model_manifest)
        stores.append(read_store(runs / name / "val"))
    members = [f"{n}/{v}" for n in names for v in view_names] if views else names
    digests = {n: store_digest(s, views) for n, s in zip(names, stores)}
    weights = {m: round(1 / len(members), 6) for m in members}
    cv = CvTable(folds=3, top_k=5, temperature=temperatures, prior=prior, fold_taus=(1.0,) * 3 if prior else (),
                 chosen="nll", beats_uniform=True,
                 rows=tuple(CvRow(n, k, 0.5, 0.45, 0.55, 0.8, 1.5) for n, k in
                            [*((m, "member") for m in members), ("uniform", "uniform"), ("nll", "method")]))
    record = BlendRecord(
        format=3, ens=__version__, method="nll", requested_method="nll", fallback=False, fusion="mixture",
        params={}, models=tuple(names), members=tuple(members), views=views, weights=weights,
        temperatures={m: 1.0 + 0.25 * i for i, m in enumerate(members)} if temperatures else None,
        train_score=1.0, class_ids=tuple(range(classes)), optimize=SplitStores("val", rows, digests),
        labels=str(val_json), stores=digests, runs=str(runs.resolve()),
        provenance={n: ModelProvenance.of_store(s) for n, s in zip(names, stores)},
        prior=PriorCorrection(file=str(data / "train2019.json"), sha256=sha256_file(data / "train2019.json"),
                              counts=tuple(int(c) for c in counts), zero_count=0.5, tau=0.7, tau_fitted=True)
        if prior else None,
        cv=cv)
    blend = root / "blends" / "b"
    blend.mkdir(parents=True)
    record.write(blend / "blend.json")
    return blend


ENS = "import sys; from ensemble.cli import main; sys.argv[0] = 'ens'; main()"


#: The source tree these tests belong to: the ens the subprocesses run.
ROOT = Path(__file__).resolve().parents[3]


def peak_rss_mb(*args, cwd: Path | None = None, ok: bool = True) -> int:
    """Peak resident memory in MB of `ens ARGS` (this tree's), as its parent sees it when it ends;
    ``ok``: it must succeed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = measure([sys.executable, "-c", ENS, *args], cwd=cwd, env=env)
    assert done.returncode == 0 or not ok, done.stderr
    return done.peak_mb


def _values(page: str) -> list[str]:
    """Every number the page holds for a reader (data-value and the figures' data-values)."""
    return re.findall(r'data-values?="([^"]*)"', page)


@pytest.mark.slow  # over 5 s on the 2-core machine
def test_report_memory_follows_memory_not_the_stores(tmp_path):
    """Two float16 stores of 12,288 rows x 8,192 classes (384 MB): at --memory 0.25 the report's
    peak resident memory is within the budget of a 64-row blend's (the interpreter, matplotlib,
    the labels), where reading the stores through their memory maps grew it by more than their
    size (old code: +600 MB over the small one)."""
    small = make_blend(tmp_path / "small", models=2, rows=64, classes=8192, temperatures=False, prior=False)
    big = make_blend(tmp_path / "big", models=2, rows=12288, classes=8192, temperatures=False, prior=False)
    base = peak_rss_mb("report", small, "--memory", "0.25")
    peak = peak_rss_mb("report", big, "--memory", "0.25")
    assert peak - base < 256 + 40, (base, peak)
    assert (big / "report.html").stat().st_size < 1_000_000


def test_report_numbers_do_not_depend_on_the_block_size(tmp_path):
    """Blocks of a few rows or the whole split in one: the same page, byte for byte, and the same
    as an in-memory computation of the blend's in-sample top-1 (views and temperatures: every
    kind of member the pass reads)."""
    from ensemble.formats.blend import BlendRecord
    from ensemble.formats.store import read_store
    from ensemble.memory import GIB
    from ensemble.report import write_report

    blend = make_blend(tmp_path, models=3, rows=700, classes=64, views=True)
    one = write_report(blend, out=tmp_path / "one.html", memory=4 * GIB)
    few = write_report(blend, out=tmp_path / "few.html", memory=3 * 6 * 64 * 4 * 4 * 37)  # 37 rows a block
    assert one.path.read_bytes() == few.path.read_bytes()
    record = BlendRecord.read(blend / "blend.json")
    stores = [read_store(tmp_path / "runs" / m / "val") for m in record.models]
    fused = record.fitted().log_proba(np.concatenate([np.asarray(s.views, np.float32) for s in stores]))
    labels = _labels(700, 64)
    top1 = float((fused.argmax(axis=1) == labels).mean())
    page = one.path.read_text()
    assert f'data-key="in_sample_top1" data-value="{top1!r}"' in page
    assert _values(page)


def test_the_page_does_not_grow_with_the_images(tmp_path):
    """100,000 val images against 300: nothing on the page is per image (figures and tables are
    per model, bin and class bucket; 24 thumbnails), so it stays the size it is, far under the
    5 MB of test_report_size (0.11 MB at 500,000 images, measured)."""
    from ensemble.report import write_report

    sizes = {rows: write_report(make_blend(tmp_path / str(rows), models=2, rows=rows, classes=8)).size
             for rows in (300, 100_000)}
    assert abs(sizes[100_000] - sizes[300]) < 0.05 * sizes[300], sizes
    assert sizes[100_000] < 1_000_000
