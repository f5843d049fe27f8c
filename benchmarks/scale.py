"""The whole path at a given shape: stores made through the real store writer, then each command
timed with its peak resident memory, measured from a parent process.

    .venv/bin/python -m benchmarks.scale                      # iNat 2021: 10,000 classes, 100,000 val,
                                                              # 500,000 test, 4 members (48 GB of stores)
    .venv/bin/python -m benchmarks.scale --inat2019           # 1,010 classes, 3,030 val, 35,350 test, 16 members
    .venv/bin/python -m benchmarks.scale --classes 10000 --val 100000 --test 500000 --members 4 \\
        --folder /tmp/scale21 --commands blend,blend-prior,submit,report,submissions [--memory GIB]

Prints a table; it is not a test (``tests/test_benchmark_scale.py`` runs a small shape).

**The data.** Under ``--folder`` (kept between runs; without it a temporary folder, removed at
the end unless ``--keep``): ``data/`` in the iNat 2021 layout (``val.json`` with labels,
``public_test.json``, ``train_counts.json``: long-tailed training counts for ``--prior``),
``runs/memberNN/{val,test}/``: float16 stores written by
:class:`ensemble.formats.store.StoreWriter` chunk by chunk, with the manifests ``ens infer``
writes, and ``work/``, where the commands run (``blends/``, ``submissions/``). A store whose
writer key (the generator's parameters) matches is kept; an interrupted generation resumes from
its written chunks. Before writing, the disk must hold the stores still to write plus the
largest one again (the writer assembles a store beside its chunks); the test stores are written
first, so the val stores' assembly never needs a test store's room twice.

**The members** (:class:`Generator`): member ``m``'s logits for a row of true class ``y`` are
``scale_m * (s_m * d_n * onehot(y) + shared_n + p_m * private_mn) + beta_m * log prior``, with an
image difficulty ``d_n`` and noise ``shared_n`` that all members share (so they are correlated,
towards the same wrong classes), private noise, a confidence ``scale_m`` and a learned training
prior of strength ``beta_m``. The signal ``s_m`` is solved for so that, without the prior term,
member ``m`` scores a chosen top-1 (0.80 down to 0.55 across members); the top-1 expected with
the prior term on the balanced val split is then computed exactly (quadrature over the noise of
the true class and the difficulty, classes grouped by their prior), and printed beside the top-1
measured on the stored (float16) values. Noise rows are drawn from a bank of standard normal
rows, each taken at a random row and a random circular shift: every row's noise is exactly iid
N(0, 1) across classes, at the cost of a gather instead of a random draw per value.

**The figures.** Each command runs as ``python -m ensemble ...`` in a fresh process started by a
small launcher (``os.fork`` + ``execv`` + ``os.wait4``), whose ``ru_maxrss`` is the command's
peak resident memory (a child forked from this large process would inherit its peak). With
``--cache cold`` (the default) the page cache of every store file is dropped
(``posix_fadvise(DONTNEED)``, these files only) before each command and before the reference
read: ONE sequential read of every file the blend reads (each member's val and test
``logits.npy`` and ``ids.npy``, 16 MiB plain reads). The blend's time is printed as a ratio to
that read (goal: at most 3x) and every command's peak against 3 GiB; ``--inat2019``'s goal is
the whole ``ens blend`` in under 5 s. *CPU s*: the command's user + system time (its threads
included), which other work on the machine inflates less than the wall time. *read GB*: what the command's read calls returned
(``/proc/PID/io`` ``rchar``, taken after it ended, before it was reaped: files, the
interpreter's modules; pages of a memory map are not counted), and for a blend that as a
multiple of the stores' bytes: about 1 when each store is read once by plain reads.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.optimize import brentq
from scipy.special import log_ndtr

from ensemble import __version__
from ensemble.fileio import write_json_atomic
from ensemble.formats.dataset import load_split
from ensemble.formats.store import DatasetRecord, ModelRecord, RunFigures, StoreManifest, StoreWriter, TtaRecord
from weights_search import log_softmax
from weights_search.metrics import correct_at_k

REPO = Path(__file__).resolve().parents[1]
#: Changes whenever the generator makes other values from the same parameters.
GENERATOR_VERSION = 1
INAT2021 = {"classes": 10_000, "val": 100_000, "test": 500_000, "members": 4}
INAT2019 = {"classes": 1010, "val": 3030, "test": 35_350, "members": 16}
COMMANDS = ("blend", "blend-prior", "submit", "report", "submissions")
RSS_GOAL_GIB = 3.0
READ_RATIO_GOAL = 3.0
INAT2019_BLEND_GOAL_S = 5.0
BANK_ROWS = 1024
#: Quadrature of the expected top-1: Gauss-Hermite nodes over the true class's noise, midpoints
#: over the difficulty.
NOISE_NODES, DIFFICULTY_NODES = 64, 32
DIFFICULTY = (0.4, 1.4)


@dataclasses.dataclass(frozen=True)
class Shape:
    classes: int
    val: int
    test: int
    members: int
    seed: int = 0

    def params(self) -> dict:
        return {**dataclasses.asdict(self), "generator": GENERATOR_VERSION}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()


def training_counts(classes: int, seed: int) -> np.ndarray:
    """Long-tailed training counts, ``250 * rank ** -0.6`` (at least 2: 250 down to 2 images, at
    most 249 distinct values), in a random class order."""
    counts = np.maximum(np.round(250 * np.arange(1, classes + 1) ** -0.6), 2).astype(np.int64)
    return np.random.default_rng([seed, 3]).permutation(counts)


def balanced_labels(rows: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class ``rows // classes`` times, the rest of the rows of random classes, shuffled."""
    labels = np.concatenate([np.repeat(np.arange(classes), rows // classes),
                             rng.choice(classes, rows % classes, replace=False)])
    return rng.permutation(labels)


class Generator:
    """Correlated members of chosen accuracy (see the module docstring)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        m, c = shape.members, shape.classes
        rng = np.random.default_rng([shape.seed, 1])
        self.target = np.linspace(0.80, 0.55, m) if m > 1 else np.array([0.70])
        self.private = rng.uniform(0.5, 0.9, m)
        self.scale = rng.uniform(1.8, 3.0, m)
        self.beta = rng.uniform(0.8, 1.2, m)
        self.sigma = np.sqrt(1 + self.private ** 2)
        self.counts = training_counts(c, shape.seed)
        self.log_prior = (np.log(self.counts) - np.log(self.counts.sum())).astype(np.float32)
        self.strength = np.array([self._solve(t, s) for t, s in zip(self.target, self.sigma)])
        bank = np.random.default_rng([shape.seed, 2]).standard_normal((BANK_ROWS, c), dtype=np.float32)
        self._windows = sliding_window_view(np.concatenate([bank, bank], axis=1), c, axis=1)
        labels_rng = np.random.default_rng([shape.seed, 4])
        self.labels = {"val": balanced_labels(shape.val, c, labels_rng),
                       "test": balanced_labels(shape.test, c, labels_rng)}

    # ------------------------------------------------------------------------ expected top-1
    def _quadrature(self):
        x, wx = np.polynomial.hermite_e.hermegauss(NOISE_NODES)
        wx = wx / wx.sum()
        lo, hi = DIFFICULTY
        d = lo + (np.arange(DIFFICULTY_NODES) + 0.5) * (hi - lo) / DIFFICULTY_NODES
        return x[:, None], wx[:, None], d[None, :]

    def _solve(self, target: float, sigma: float) -> float:
        """The signal at which a member without the prior term scores ``target`` top-1:
        ``E[Phi(x + s d / sigma) ** (C - 1)]``, x ~ N(0, 1), d ~ U(DIFFICULTY)."""
        x, wx, d = self._quadrature()
        c = self.shape.classes

        def top1(s: float) -> float:
            return float((wx * np.exp((c - 1) * log_ndtr(x + s * d / sigma))).sum() / d.size)

        return brentq(lambda s: top1(s) - target, 0.0, 200.0, xtol=1e-6)

    def expected_top1(self, member: int, split: str = "val") -> float:
        """Member ``member``'s expected top-1 on ``split``'s labels, prior term included: for a
        true class with prior ``a_y``, a class ``c`` loses when its noise is below the true
        class's noise plus ``s d + (beta / scale) (a_y - a_c)``; classes of one prior value are
        grouped, so the cost is (distinct values)^2 x the quadrature's nodes."""
        x, wx, d = self._quadrature()
        values, inverse, per_value = np.unique(self.log_prior, return_inverse=True, return_counts=True)
        labelled = np.bincount(inverse[self.labels[split]], minlength=values.size)
        k = self.beta[member] / self.scale[member]
        s, sigma = self.strength[member], self.sigma[member]
        total = 0.0
        for u in np.flatnonzero(labelled):
            others = per_value.astype(np.float64)
            others[u] -= 1
            shift = (s * d[None] + k * (values[u] - values)[:, None, None]) / sigma  # (V, 1, D)
            log_win = (others[:, None, None] * log_ndtr(x[None] + shift)).sum(axis=0)  # (X, D)
            total += labelled[u] * float((wx * np.exp(log_win)).sum() / d.size)
        return total / self.labels[split].size

    # ------------------------------------------------------------------------ the logits
    def _noise(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``(rows, C)`` float32 standard normal noise: bank rows at random circular shifts."""
        return self._windows[rng.integers(0, BANK_ROWS, rows), rng.integers(0, self.shape.classes, rows)]

    def block(self, split: str, start: int, stop: int) -> np.ndarray:
        """``(M, stop - start, C)`` float32 logits of rows ``start:stop`` of ``split``; the same
        values whenever asked (the noise of a block depends on its split and first row only)."""
        labels = self.labels[split][start:stop]
        rows = labels.size
        rng = np.random.default_rng([self.shape.seed, 5, 0 if split == "val" else 1, start])
        difficulty = rng.uniform(*DIFFICULTY, rows).astype(np.float32)
        shared = self._noise(rng, rows)
        out = np.empty((self.shape.members, rows, self.shape.classes), np.float32)
        index = np.arange(rows)
        for m in range(self.shape.members):
            z = out[m]
            np.multiply(self._noise(rng, rows), np.float32(self.private[m]), out=z)
            z += shared
            z[index, labels] += np.float32(self.strength[m]) * difficulty
            z *= np.float32(self.scale[m])
            z += np.float32(self.beta[m]) * self.log_prior
        return out


# ---------------------------------------------------------------------------------------- data

def chunk_rows(classes: int) -> int:
    """Rows per store chunk: about 32 MB of float16 (a power of two, 256 to 8192)."""
    return int(min(8192, max(256, 2 ** int(np.log2(max(1, 32e6 / (2 * classes)))))))


def _write_json(path: Path, doc) -> None:
    write_json_atomic(path, doc)


def make_data(folder: Path, shape: Shape, generator: Generator) -> Path:
    """``folder/data``: val.json (labels), public_test.json, train_counts.json, test labels;
    kept when ``params.json`` there says they were made with the same shape."""
    data = folder / "data"
    stamp = data / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == shape.params():
        return data
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    categories = [{"id": c, "name": f"species {c}"} for c in range(shape.classes)]
    for split, first, name in (("val", 0, "val.json"), ("test", shape.val, "public_test.json")):
        rows = getattr(shape, split)
        images = [{"id": first + i, "file_name": f"{split}/{first + i}.jpg", "width": 500, "height": 375}
                  for i in range(rows)]
        doc = {"info": {"description": "benchmarks.scale"}, "images": images, "categories": categories}
        if split == "val":
            doc["annotations"] = [{"id": i, "image_id": i, "category_id": int(y)}
                                  for i, y in enumerate(generator.labels["val"].tolist())]
        _write_json(data / name, doc)
    np.save(data / "test_labels.npy", generator.labels["test"])
    _write_json(data / "train_counts.json", {str(c): int(n) for c, n in enumerate(generator.counts.tolist())})
    _write_json(stamp, shape.params())
    return data


def _manifest(shape: Shape, member: int, split, chunk: int) -> StoreManifest:
    """What `ens infer` writes for a float16 store of one model (ONNX file made up, flip TTA not
    kept), less the arrays' own fields, which the writer adds."""
    sha = hashlib.sha256(f"{shape.digest()} member {member}".encode()).hexdigest()
    file = f"models/member{member:02d}.onnx"
    return StoreManifest(
        model=ModelRecord(file=file, sha256=sha, architecture="synthetic", input_size=224, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), resize="center-crop", crop_pct=0.875, interpolation="bilinear",
                          precision="fp16", class_ids=None, foreign=False),
        dataset=DatasetRecord(split=split.name, source=str(split.source), sha256=split.sha256, images=len(split)),
        tta=TtaRecord(views=("identity", "flip"), merge="mean-logits"),
        pixels=3, device="cuda", provider="CUDAExecutionProvider", device_fallback=None, batch_size=64,
        chunk_size=chunk, ens_version=__version__, engine="local", cluster=None,
        command=f"ens infer {file} --index {split.source} --tta flip --out runs",
        figures=RunFigures(workers=4, images_per_s=None, seconds=None, decode_wait_s=None, model_images_per_s=None))


def store_bytes(shape: Shape, split: str) -> int:
    return getattr(shape, split) * (shape.classes * 2 + 8)


def write_stores(folder: Path, shape: Shape, generator: Generator, data: Path, log=print) -> dict:
    """Every member's test then val store under ``folder/runs`` (kept when complete with the same
    key, resumed from written chunks otherwise); returns the val figures the generator measured
    on the stored values (each member's top-1, the uniform mixture's), from ``stats.json`` when
    the val stores were kept."""
    runs = folder / "runs"
    chunk = chunk_rows(shape.classes)
    stats_file = folder / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    if stats is not None and stats.get("params") != shape.params():
        stats = None
    splits = {"test": load_split(data / "public_test.json", "test"), "val": load_split(data / "val.json", "val")}
    writers = {}
    for name, split in splits.items():
        key_base = {"benchmark": "scale", "params": shape.params(), "dataset_sha256": split.sha256,
                    "dtype": "float16", "rows": len(split), "chunk_size": chunk}
        writers[name] = []
        for m in range(shape.members):
            writer = StoreWriter(runs / f"member{m:02d}" / name, {**key_base, "member": m}, len(split), chunk)
            manifest = _manifest(shape, m, split, chunk)
            writers[name].append((writer, manifest, writer.open(manifest)))
    # Room: the chunks still to write, and the largest store again while it is assembled.
    todo = {name: [w for w, _, complete in ws if not complete] for name, ws in writers.items()}
    need = sum(sum(store_bytes(shape, name) * (w.chunks - len(w.done)) / w.chunks for w in ws)
               for name, ws in todo.items())
    need += max((store_bytes(shape, name) for name, ws in todo.items() if ws), default=0)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(f"{folder}: the stores still to write need about {need / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free; free some room or give another --folder")
    for name in ("test", "val"):
        split, entries = splits[name], writers[name]
        measure = name == "val" and (stats is None or any(not complete for _, _, complete in entries))
        if all(complete for _, _, complete in entries) and not measure:
            log(f"  {name}: {shape.members} stores kept")
            continue
        started, rows_done = time.perf_counter(), 0
        hits = np.zeros(shape.members + 1, np.int64)
        for index in range(-(-len(split) // chunk)):
            lo, hi = index * chunk, min((index + 1) * chunk, len(split))
            missing = [(w, m) for m, (w, _, complete) in enumerate(entries) if not complete and index not in w.done]
            if not missing and not measure:
                continue
            block = generator.block(name, lo, hi)
            keep = np.ones(hi - lo, bool)
            for writer, m in missing:
                writer.write_chunk(index, block[m], keep)
            if measure:
                hits += _val_hits(block, generator.labels["val"][lo:hi])
            rows_done += hi - lo
            if index % 16 == 15:
                rate = rows_done / (time.perf_counter() - started)
                log(f"  {name}: {hi:,} of {len(split):,} rows ({rate:,.0f} rows/s)", end="\r")
        for (writer, manifest, complete) in entries:
            if not complete:
                writer.finish(split.ids, split.paths, manifest)
            writer.release()
        log(f"  {name}: {shape.members} stores written in {time.perf_counter() - started:.1f} s" + " " * 20)
        if measure:
            stats = {"params": shape.params(), "member_top1": (hits[:-1] / len(split)).tolist(),
                     "uniform_top1": float(hits[-1] / len(split))}
            write_json_atomic(stats_file, stats)
    for entries in writers.values():
        for writer, _, _ in entries:
            writer.release()
    return stats


def _val_hits(block: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows right at top-1 of each member and of their uniform mixture, on the float16 values the
    stores hold (ties ranked as weights_search ranks them)."""
    stored = block.astype(np.float16).astype(np.float32)
    log_p = log_softmax(stored)
    hits = [int(correct_at_k(lp, labels, 1).sum()) for lp in log_p]
    top = log_p.max(axis=0)
    mixture = top + np.log(np.exp(log_p - top).mean(axis=0))
    return np.array(hits + [int(correct_at_k(mixture, labels, 1).sum())])


# ---------------------------------------------------------------------------------------- timing

#: Runs argv[2:] and writes its wall time, CPU time, peak resident memory (KB) and the bytes its read calls
#: returned (``rchar``: files, pipes, the interpreter's own modules; not pages of memory maps) to
#: argv[1] as JSON. A small process of its own starts it: a child forked from this large one would
#: start at its peak.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: its /proc/PID/io is still there
seconds = time.perf_counter() - start
try:
    with open(f"/proc/{pid}/io") as fh:
        io = {k: int(v) for k, v in (line.split(":") for line in fh if line.strip())}
except OSError:
    io = {}
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss,
               "rchar": io.get("rchar")}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def store_files(folder: Path, shape: Shape) -> list[Path]:
    """The files the blend reads: each member's val and test logits and ids."""
    return [folder / "runs" / f"member{m:02d}" / split / name
            for m in range(shape.members) for split in ("val", "test") for name in ("ids.npy", "logits.npy")]


def drop_cache(files) -> None:
    """Drop these files' pages from the page cache (written back first): the next read is cold."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files) -> tuple[float, int]:
    """Seconds to read ``files`` once, in order, with plain 16 MiB reads; and the bytes read."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return time.perf_counter() - start, total


def run_command(name: str, argv: list[str], cwd: Path, scratch: Path) -> dict:
    """Run ``python -m ensemble *argv`` under the launcher; its time and peak RSS. A command that
    fails stops the benchmark with its exit status and the end of what it printed."""
    figures = scratch / f"{name}.json"
    command = [sys.executable, "-c", LAUNCHER, str(figures), sys.executable, "-m", "ensemble", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    shown = "ens " + " ".join(argv)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise SystemExit(f"benchmarks.scale: {name} failed (exit {done.returncode}): {shown}\n{tail}")
    result = json.loads(figures.read_text())
    return {"command": name, "argv": shown, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
            "peak_rss_gib": result["maxrss_kb"] * 1024 / 2 ** 30, "read_bytes": result["rchar"],
            "stdout": done.stdout}


def command_lines(names, memory: float | None) -> list[tuple[str, list[str]]]:
    mem = [] if memory is None else ["--memory", str(memory)]
    lines = {
        "blend": ["blend", "--runs", "../runs", "--optimize", "val", "--method", "nll", "--cv", "5",
                  "--out", "blends/nll", *mem],
        "blend-prior": ["blend", "--runs", "../runs", "--optimize", "val", "--method", "nll", "--cv", "5",
                        "--prior", "../data/train_counts.json", "--out", "blends/nll-prior", *mem],
        "submit": ["submit", "blends/nll", "--data", "../data", "--format", "inat2021", "--dry-run",
                   "--name", "scale", *mem],
        "report": ["report", "blends/nll-prior" if "blend-prior" in names else "blends/nll", *mem],
        "submissions": ["submissions"],
    }
    return [(name, lines[name]) for name in COMMANDS if name in names]


def predictions_top1(path: Path, ids_first: int, labels: np.ndarray) -> float:
    """Top-1 of a predictions.csv against the generator's test labels (rows by image id)."""
    hits = rows = 0
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            rows += 1
            hits += int(row[1]) == labels[int(row[0]) - ids_first]
    return hits / rows


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int)
    parser.add_argument("--val", type=int, help="labelled rows, fitted on")
    parser.add_argument("--test", type=int, help="rows of the applied split")
    parser.add_argument("--members", type=int)
    parser.add_argument("--inat2019", action="store_true", help="1,010 classes, 3,030 val, 35,350 test, 16 members "
                        "(shape options given beside it win)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, help="where the data, stores and outputs go, kept and reused "
                        "[default: a temporary folder]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help=f"of {','.join(COMMANDS)}, comma-separated; empty: only make the data")
    parser.add_argument("--memory", type=float, metavar="GIB", help="passed to blend, submit and report")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold",
                        help="cold: drop the stores' cached pages before each timing; warm: leave them")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    base = INAT2019 if args.inat2019 else INAT2021
    shape = Shape(*(getattr(args, k) if getattr(args, k) is not None else base[k]
                    for k in ("classes", "val", "test", "members")), seed=args.seed)
    if min(shape.classes, shape.val, shape.test, shape.members) < 1 or shape.classes < 2:
        parser.error("--classes must be at least 2; --val, --test and --members at least 1")
    if shape.val < 5:
        parser.error("--val must be at least 5 (5-fold CV)")
    names = [n.strip() for n in args.commands.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"--commands: unknown {', '.join(unknown)} (choose from {', '.join(COMMANDS)})")

    folder = args.folder if args.folder is not None else Path(tempfile.mkdtemp(prefix="ens-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run(folder, shape, names, args)
    finally:
        if args.folder is None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.folder is None:
            print(f"kept {folder}")


def _run(folder: Path, shape: Shape, names: list[str], args) -> int:
    print(f"shape: {shape.classes:,} classes, val {shape.val:,}, test {shape.test:,}, {shape.members} members; "
          f"stores {shape.members * (store_bytes(shape, 'val') + store_bytes(shape, 'test')) / 1e9:.2f} GB "
          f"float16 in {folder}")
    print(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.1f} "
          f"GiB, load {os.getloadavg()[0]:.1f}; numpy {np.__version__}")
    start = time.perf_counter()
    generator = Generator(shape)
    expected = [generator.expected_top1(m) for m in range(shape.members)]
    data = make_data(folder, shape, generator)
    stats = write_stores(folder, shape, generator, data)
    print(f"data ready in {time.perf_counter() - start:.1f} s")

    work = folder / "work"
    for old in ("blends", "submissions"):
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="launch-", dir=folder))
    files = store_files(folder, shape)
    results, read = [], None
    try:
        if {"blend", "blend-prior"} & set(names):
            if args.cache == "cold":
                drop_cache(files)
            seconds, total = sequential_read(files)
            read = {"seconds": seconds, "bytes": total, "cache": args.cache}
        for name, argv in command_lines(names, args.memory):
            if args.cache == "cold":
                drop_cache(files)
            results.append(run_command(name, argv, work, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    figures = {"shape": shape.params(), "folder": str(folder), "cache": args.cache, "read": read,
               "expected_member_top1": expected, "target_member_top1": generator.target.tolist(),
               "measured": stats, "commands": [], "blends": {}}
    for r in results:
        row = {k: v for k, v in r.items() if k != "stdout"}
        if r["command"].startswith("blend") and read:
            row["read_ratio"] = r["seconds"] / read["seconds"]
            if r["read_bytes"] is not None:
                row["stores_read"] = r["read_bytes"] / read["bytes"]
        figures["commands"].append(row)
    for name in ("blend", "blend-prior"):
        blend_json = work / "blends" / ("nll" if name == "blend" else "nll-prior") / "blend.json"
        if name in names and blend_json.is_file():
            record = json.loads(blend_json.read_text())
            rows = {row["name"]: row for row in record["cv"]["rows"]}
            figures["blends"][name] = {
                "cv": rows, "tau": (record.get("prior") or {}).get("tau"),
                "test_top1": predictions_top1(blend_json.parent / "predictions.csv", shape.val,
                                              np.load(data / "test_labels.npy"))}
    print_table(figures, shape)
    if args.json:
        write_json_atomic(args.json, figures)
    return 0


def print_table(figures: dict, shape: Shape) -> None:
    read = figures["read"]
    if read:
        print(f"\none sequential read of the blend's stores ({read['bytes'] / 1e9:.2f} GB, {read['cache']}): "
              f"{read['seconds']:.1f} s ({read['bytes'] / 1e9 / read['seconds']:.2f} GB/s)")
    inat2019 = (shape.classes, shape.val, shape.test) == (INAT2019["classes"], INAT2019["val"], INAT2019["test"])
    print(f"\n  {'command':<12} {'seconds':>8} {'CPU s':>7} {'peak RSS GiB':>13} {'RSS goal':>9} {'x read':>7} "
          f"{'read GB':>8} {'x stores':>9}  goal")
    for row in figures["commands"]:
        rss_ok = "ok" if row["peak_rss_gib"] <= RSS_GOAL_GIB else "OVER"
        ratio, goal = "", ""
        read_gb = "" if row["read_bytes"] is None else f"{row['read_bytes'] / 1e9:.2f}"
        stores = f"{row['stores_read']:.2f}" if "stores_read" in row else ""
        if "read_ratio" in row:
            ratio = f"{row['read_ratio']:.2f}x"
            goal = f"<= {READ_RATIO_GOAL:.0f}x read: {'ok' if row['read_ratio'] <= READ_RATIO_GOAL else 'not met'}"
            if inat2019 and row["command"] == "blend":
                met = "ok" if row["seconds"] < INAT2019_BLEND_GOAL_S else "not met"
                goal += f"; < {INAT2019_BLEND_GOAL_S:.0f} s: {met}"
        print(f"  {row['command']:<12} {row['seconds']:>8.2f} {row['cpu_seconds']:>7.2f} {row['peak_rss_gib']:>13.2f} "
              f"{f'{rss_ok} {RSS_GOAL_GIB:.0f}':>9} {ratio:>7} {read_gb:>8} {stores:>9}  {goal}")
    for row in figures["commands"]:
        print(f"    {row['command']}: {row['argv']}")
    measured = figures["measured"]
    print("\nmember top-1 on val: target without prior / expected with it / measured on the stores")
    for m, (t, e, got) in enumerate(zip(figures["target_member_top1"], figures["expected_member_top1"],
                                        measured["member_top1"])):
        print(f"  member{m:02d}  {t:.3f} / {e:.4f} / {got:.4f}")
    print(f"  uniform mixture measured: {measured['uniform_top1']:.4f}")
    for name, blend in figures["blends"].items():
        method = next(r for r in blend["cv"].values() if r["kind"] == "method")
        uniform = next(r for r in blend["cv"].values() if r["kind"] == "uniform" and not r.get("prior"))
        prior = [r for r in blend["cv"].values() if r["kind"] == "method" and r.get("prior")]
        text = (f"  {name}: CV top-1 uniform {uniform['top1']:.4f}, {method['name']} {method['top1']:.4f}"
                f" [{method['top1_low']:.3f}, {method['top1_high']:.3f}]")
        if prior:
            text += f", {prior[0]['name']} {prior[0]['top1']:.4f} (tau {blend['tau']:.3f})"
        print(text + f"; test top-1 of predictions.csv {blend['test_top1']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
