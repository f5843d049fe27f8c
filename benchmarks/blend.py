"""Blend benchmark on generated logits shaped like iNat 2019: fit times, optima reached, memory,
and the long-tail prior correction.

    .venv/bin/python -m benchmarks.blend            # M = 4, 8, 16; CV of every method; full test split
    .venv/bin/python -m benchmarks.blend --quick    # M = 4, 16; CV of nll; a fifth of the test split
    .venv/bin/python -m benchmarks.blend --prior    # only the prior correction (every method, M = 4, 16)

Prints figures; it is not a test. For M members it times every method of
``weights_search`` (log-softmax included) against the usual Kaggle-notebook approach measured
in the same run: scipy SLSQP with numerical gradients on the full mixture
``sum_m w_m p_m`` (equality constraint ``sum w = 1``, bounds ``[0, 1]``, no analytic gradient),
and shows the validation NLL and top-1 each reaches, so speed is not bought with a worse
optimum. Then it writes the M = 16 test split as float16 ``.npy`` stores in a temporary folder
and measures the peak memory of fusing them, memory-mapped and streamed, in a fresh process.

The prior correction (``--prior``, and the last table of every run) uses :class:`LongTailGenerator`:
members that learned a long-tailed training prior (500 images for the commonest class down to
2), scored on balanced validation (3 per class) and test (5 per class) splits. For M = 4 and 16
it times ``fit_blend`` without and with the prior (``tau`` fitted with the weights; log-softmax
included; goal: the prior adds under 50%) and reports the fitted ``tau`` and the test top-1
error without and with the correction.

Fit times are the best of ``--repeats`` runs. On a shared machine, BLAS threads waiting for a
busy core slow the small matrix products of the fits; compare with ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import minimize

from benchmarks.rss import proc_status
from weights_search import (
    METHODS, MIXTURE, FittedBlend, LogitAdjustment, blend_chunks, class_log_prior, cross_validate, fit_blend,
    fit_temperatures, get_method, log_softmax, top_k)
from weights_search.metrics import mean_nll, top1

N_CLASSES = 1010
VAL_PER_CLASS = 3  # 3,030 validation images
N_TEST = 35350


class Generator:
    """Correlated members of varying quality.

    Member ``m``'s logits for image ``n`` are ``scale_m * (strength_m * difficulty_n * onehot(y_n)
    + shared_n + private_mn)``: a model-specific signal strength, an image difficulty that all
    members share, shared noise (images that fool one model tend to fool the others, towards
    the same wrong classes) and private noise; ``scale_m`` makes some members over- and some
    under-confident.
    """

    def __init__(self, n_members: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        # Tuned so that members score 0.5 to 0.8 top-1 and their NLL-optimal temperatures lie
        # around 0.8 to 1.1, like fine-tuned iNat 2019 classifiers.
        self.strength = rng.uniform(4.0, 6.5, n_members)
        self.private = rng.uniform(0.5, 0.7, n_members)
        self.scale = rng.uniform(1.8, 3.0, n_members)

    def logits(self, labels: np.ndarray, members: int, stream: int) -> np.ndarray:
        """``(members, len(labels), C)`` float16 logits; ``stream`` picks independent noise."""
        rng = np.random.default_rng([self.seed, stream])
        n = labels.size
        difficulty = rng.uniform(0.4, 1.4, n).astype(np.float32)
        shared = rng.standard_normal((n, N_CLASSES), dtype=np.float32)
        out = np.empty((members, n, N_CLASSES), dtype=np.float16)
        for m in range(members):
            z = shared + self.private[m] * rng.standard_normal((n, N_CLASSES), dtype=np.float32)
            z[np.arange(n), labels] += self.strength[m] * difficulty
            out[m] = self.scale[m] * z
        return out


class LongTailGenerator(Generator):
    """Members trained on a long-tailed set: :class:`Generator`'s logits plus ``beta_m log pi``.

    ``pi`` is the training class frequency: counts ``500 * rank ** -0.9`` (at least 2: 500 down
    to 2 images, as in iNat 2019), in a random class order. Each member learned the prior to its
    own degree, ``beta_m`` in 0.8 to 1.2 (in units of its log-probabilities), so the blend's
    ideal ``tau`` is near 1 and no single value fits every member exactly.
    """

    def __init__(self, n_members: int, seed: int) -> None:
        super().__init__(n_members, seed)
        rng = np.random.default_rng([seed, 7])
        counts = np.maximum(np.round(500 * np.arange(1, N_CLASSES + 1) ** -0.9), 2)
        self.counts = rng.permutation(counts).astype(np.int64)
        self.beta = rng.uniform(0.8, 1.2, n_members)
        self.log_prior = class_log_prior(self.counts)

    def logits(self, labels: np.ndarray, members: int, stream: int) -> np.ndarray:
        out = super().logits(labels, members, stream)
        for m in range(members):
            out[m] += (self.beta[m] * self.log_prior).astype(np.float16)
        return out


def slsqp_baseline(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The notebook approach: float64 probabilities, then SLSQP on the log-loss of the full mixture.

    (In float32 the finite differences of SLSQP's default step, 1.5e-8, drown in rounding and
    it stops at the start.)
    """
    start = time.perf_counter()
    probs = np.exp(log_softmax(logits), dtype=np.float64)
    rows = np.arange(labels.size)
    n_members = probs.shape[0]

    def log_loss(w: np.ndarray) -> float:
        blended = np.tensordot(w, probs, axes=1)
        return float(-np.log(np.clip(blended[rows, labels], 1e-15, None)).mean(dtype=np.float64))

    result = minimize(log_loss, np.full(n_members, 1.0 / n_members), method="SLSQP",
                      bounds=[(0.0, 1.0)] * n_members, constraints={"type": "eq", "fun": lambda w: w.sum() - 1})
    return time.perf_counter() - start, result.x


def time_methods(logits: np.ndarray, labels: np.ndarray, repeats: int) -> list[dict]:
    """Fit every method, then SLSQP, on the whole validation split: the best of ``repeats``
    wall times (log-softmax included), and the NLL and top-1 of the fitted blend."""
    rows = []
    for name in METHODS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            method = get_method(name).fit(log_softmax(logits), labels)
            times.append(time.perf_counter() - start)
        fused = method.predict_log_proba(log_softmax(logits))
        rows.append({"method": name, "seconds": min(times), "nll": mean_nll(fused, labels), "top1": top1(fused, labels)})
    times = []
    for _ in range(repeats):
        seconds, weights = slsqp_baseline(logits, labels)
        times.append(seconds)
    blended = FittedBlend("slsqp", MIXTURE, tuple(np.clip(weights, 0, None))).log_proba(logits)
    rows.append({"method": "SLSQP (numerical)", "seconds": min(times), "nll": mean_nll(blended, labels),
                 "top1": top1(blended, labels)})
    return rows


def write_test_stores(folder: Path, generator: Generator, members: int, n_rows: int, chunk: int = 4096) -> list[Path]:
    """Write ``members`` float16 ``(n_rows, C)`` stores, chunk by chunk."""
    rng = np.random.default_rng(generator.seed + 1)
    labels = rng.integers(0, N_CLASSES, n_rows)
    paths = [folder / f"member{m:02d}.npy" for m in range(members)]
    stores = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(n_rows, N_CLASSES)) for p in paths]
    for i, start in enumerate(range(0, n_rows, chunk)):
        block = generator.logits(labels[start:start + chunk], members, stream=1000 + i)
        for m, store in enumerate(stores):
            store[start:start + chunk] = block[m]
    for store in stores:
        store.flush()
    return paths


def fuse_child(folder: str, n_members: int) -> None:
    """Runs in a fresh process: fuse the stores in ``folder`` to top-5 and print memory figures."""
    before = proc_status("VmRSS")
    paths = sorted(Path(folder).glob("member*.npy"))[:n_members]
    stores = [np.load(p, mmap_mode="r") for p in paths]
    weights = np.random.default_rng(0).dirichlet(np.ones(n_members))
    blend = FittedBlend("nll", "mixture", tuple(weights), tuple(np.linspace(0.8, 1.5, n_members)))
    n_rows = stores[0].shape[0]
    ids = np.empty((n_rows, 5), dtype=np.int64)
    probs = np.empty((n_rows, 5), dtype=np.float32)
    start = time.perf_counter()
    for first, chunk in blend_chunks(stores, blend):
        ids[first:first + len(chunk)], probs[first:first + len(chunk)] = top_k(chunk, 5)
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before": before, "peak": proc_status("VmHWM"), "file_backed": proc_status("RssFile"),
                      "seconds": seconds, "rows": n_rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 4 and 16 only, CV of nll only, a fifth of the test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="fit times are the best of this many runs")
    parser.add_argument("--prior", action="store_true", help="only the long-tail prior correction table")
    parser.add_argument("--fuse-child", nargs=2, metavar=("DIR", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fuse_child:
        fuse_child(args.fuse_child[0], int(args.fuse_child[1]))
        return

    if args.prior:
        print_prior_table(args.seed, args.repeats, METHODS)
        return
    sizes = (4, 16) if args.quick else (4, 8, 16)
    n_test = N_TEST // 5 if args.quick else N_TEST
    generator = Generator(max(sizes), args.seed)
    labels = np.random.default_rng(args.seed).permutation(np.repeat(np.arange(N_CLASSES), VAL_PER_CLASS))
    t0 = time.perf_counter()
    val = generator.logits(labels, max(sizes), stream=0)
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, {os.cpu_count()} CPUs, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.1f}")
    print(f"validation: {val.shape[1]:,} x {val.shape[2]:,}, {val.shape[0]} members "
          f"(generated in {time.perf_counter() - t0:.1f} s); member top-1: "
          + ", ".join(f"{top1(lp, labels):.2f}" for lp in log_softmax(val)))

    for m in sizes:
        print_fit_table(val[:m], labels, args.repeats)
    m = max(sizes)
    start = time.perf_counter()
    fit_temperatures(val[:m], labels)
    print(f"\ntemperatures for M = {m}: {time.perf_counter() - start:.2f} s")
    runs = [("nll", False)] if args.quick else [(name, False) for name in METHODS if name != "uniform"] + [("nll", True)]
    print_cv_table(val[:m], labels, runs)
    print_fusion_memory(generator, m, n_test)
    print_prior_table(args.seed, args.repeats, ("nll",) if args.quick else METHODS)


def print_fit_table(logits: np.ndarray, labels: np.ndarray, repeats: int) -> None:
    rows = time_methods(logits, labels, repeats)
    base = rows[-1]["seconds"]
    print(f"\nM = {logits.shape[0]}: fit on {logits.shape[1]:,} x {logits.shape[2]:,} (log-softmax included)")
    print(f"  {'method':<18} {'seconds':>8} {'SLSQP / this':>13} {'val NLL':>9} {'val top-1':>10}")
    for r in rows:
        print(f"  {r['method']:<18} {r['seconds']:>8.3f} {base / r['seconds']:>12.1f}x {r['nll']:>9.4f} {r['top1']:>10.4f}")


def print_cv_table(logits: np.ndarray, labels: np.ndarray, runs: list[tuple[str, bool]]) -> None:
    """5-fold CV of each ``(method, temperature)``, with uniform's row once per temperature setting."""
    print(f"\n5-fold CV of M = {logits.shape[0]} (every fold fits its own temperatures and weights)")
    print(f"  {'method':<10} {'temperature':>11} {'seconds':>8} {'CV top-1':>9} {'95% interval':>15} {'CV NLL':>7}  beats uniform")
    uniform_shown = set()
    for name, temperature in runs:
        start = time.perf_counter()
        report = cross_validate(logits, labels, name, temperature=temperature)
        rows = [(report.method_row, f"{time.perf_counter() - start:.1f}", str(report.beats_uniform))]
        if temperature not in uniform_shown:
            uniform_shown.add(temperature)
            rows.insert(0, (report.uniform_row, "", ""))
        for row, took, beats in rows:
            print(f"  {row.name:<10} {str(temperature):>11} {took:>8} {row.top1:>9.4f} "
                  f"{f'[{row.top1_low:.3f}, {row.top1_high:.3f}]':>15} {row.nll:>7.4f}  {beats}")


def print_prior_table(seed: int, repeats: int, methods) -> None:
    """Fit time and test error without and with the prior correction, at M = 4 and 16."""
    generator = LongTailGenerator(16, seed)
    rng = np.random.default_rng([seed, 8])
    val_labels = rng.permutation(np.repeat(np.arange(N_CLASSES), VAL_PER_CLASS))
    test_labels = rng.permutation(np.repeat(np.arange(N_CLASSES), 5))
    val = generator.logits(val_labels, 16, stream=0)
    test = generator.logits(test_labels, 16, stream=2000)
    prior = LogitAdjustment(generator.log_prior)
    print(f"\nlong-tail prior: training counts {generator.counts.max()} down to {generator.counts.min()}, members' "
          f"prior strength beta {generator.beta.min():.2f}-{generator.beta.max():.2f}; balanced val "
          f"{val.shape[1]:,} and test {test.shape[1]:,} rows; fit_blend, log-softmax included, best of {repeats}")
    print(f"  {'M':>2} {'method':<9} {'plain s':>8} {'prior s':>8} {'added':>7} {'tau':>6} "
          f"{'test err plain':>15} {'prior':>7} {'gain':>7}")
    for m in (4, 16):
        for name in methods:
            # Plain and corrected fits take turns, so that a busy spell slows both alike.
            times: dict[bool, list[float]] = {False: [], True: []}
            blends = {}
            for _ in range(repeats):
                for corrected in (False, True):
                    start = time.perf_counter()
                    blends[corrected] = fit_blend(val[:m], val_labels, name, prior=prior if corrected else None)
                    times[corrected].append(time.perf_counter() - start)
            plain_s, prior_s = min(times[False]), min(times[True])
            plain_err, prior_err = (1 - top1(blends[c].log_proba(test[:m]), test_labels) for c in (False, True))
            tau = blends[True].tau
            print(f"  {m:>2} {name:<9} {plain_s:>8.3f} {prior_s:>8.3f} {prior_s / plain_s - 1:>+7.0%} {tau:>6.3f} "
                  f"{plain_err:>15.4f} {prior_err:>7.4f} {plain_err - prior_err:>+7.4f}")


def print_fusion_memory(generator: Generator, members: int, n_rows: int) -> None:
    """Write the test stores, then fuse them in a fresh process and print its peak memory."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_test_stores(Path(folder), generator, members, n_rows)
        print(f"\ntest split: {n_rows:,} x {N_CLASSES:,} x {members} float16 stores written in "
              f"{time.perf_counter() - start:.1f} s")
        out = subprocess.run([sys.executable, "-m", "benchmarks.blend", "--fuse-child", folder, str(members)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    fig = json.loads(out)
    print(f"fusing them memory-mapped, 2,048 rows at a time, to top-5: {fig['seconds']:.1f} s; "
          f"peak RSS increase {(fig['peak'] - fig['rss_before']) / 2**30:.2f} GiB "
          f"(of which up to {fig['file_backed'] / 2**30:.2f} GiB are mapped file pages, reclaimable page cache)")

if __name__ == "__main__":
    main()
