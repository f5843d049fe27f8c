"""`ens demo` (what `make demo` runs): the whole pipeline on a small competition of real images.

1. builds a competition in the exact iNat 2019 layout from scikit-learn's digits, each image
   with iNat 2021's place and date fields (data.py);
2. trains three torchvision architectures briefly on the CPU and saves their checkpoints the
   ways users do (train.py; cached, so a second run skips training), on a fixed number of
   PyTorch threads with deterministic algorithms, so that the same seed gives the same table
   whatever the machine's cores or load;
3. runs the public commands, each in a subprocess, in the work folder: `ens export` for each
   checkpoint, `ens infer --tta flip,scale` on val and test, `ens blend --optimize val` (which
   notes that data/train2019.json could correct the long-tailed training prior), the same with
   `--prior data/train2019.json` (blends/demo), and with `--geo-prior data/train2019.json` too
   (blends/geo: the place and date of each image, data.RANGES), `ens report` of that blend (its
   path printed), `ens submit --dry-run` of it; then scores the CSV against the answers only the
   demo holds;
4. prints one table: per model, uniform and the nll blend, each without and with the prior
   correction, the nll blend with both corrections, CV top-1 on validation and top-1 error on
   test, and the submission's path.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ensemble.demo.data import RANGES, Competition, DemoSpec, make_competition
from ensemble.demo.train import TRAIN_THREADS, Recipe, train_all
from ensemble.errors import EnsError
from ensemble.formats.blend import BlendRecord
from ensemble.formats.common import read_json


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes. The defaults are the real demo; :meth:`quick` is a smoke run for tests."""

    spec: DemoSpec = DemoSpec()
    # Three architectures that each learn in about a minute on 2 CPU cores. Mobile networks
    # divide their input by 32 and need large inputs to see the strokes (mobilenet_v3_small at
    # 40 px stayed near 0.2 top-1, at 96 px it reaches 0.85); a plain ResNet does well at 40 px.
    # The long-tailed training split holds about a third of the balanced one's images, hence
    # three times the epochs of a balanced split for the same training time.
    recipes: tuple[Recipe, ...] = field(default_factory=lambda: (
        Recipe("resnet18", "ddp-state-dict", epochs=12, input_size=40, lr=2e-3),
        Recipe("mobilenet_v3_small", "training-checkpoint", epochs=24, input_size=96, lr=2e-3,
               channels_last=True, dropout=0.0),
        Recipe("densenet121", "whole-model", epochs=9, input_size=40, lr=2e-3, channels_last=True),
    ))
    tta: str = "flip,scale"
    cv: int = 5
    #: PyTorch threads training the networks: the checkpoints, and so the table, depend on this
    #: number, not on the cores or the load (train.TRAIN_THREADS).
    threads: int = TRAIN_THREADS

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Tiny sizes and one epoch: the whole path in well under a minute, for tests."""
        return cls(spec=DemoSpec(canvas=48, val_per_class=4, test_per_class=3, train_per_class=4, train_copies=1),
                   cv=2, recipes=tuple(replace(r, epochs=1, input_size=40) for r in cls().recipes))


@dataclass(frozen=True)
class Row:
    name: str
    cv_top1: float
    cv_low: float
    cv_high: float
    test_error: float


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[Row, ...]
    submission: Path
    method: str
    seconds: float
    report: Path | None = None  #: the `ens report` page of the demo's blend


def _step(log: Callable[[str], None], number: int, title: str):
    log(f"[{number}/6] {title}")
    return time.perf_counter()


def _ens(workdir: Path, args: Sequence[str], log: Callable[[str], None], threads: int | None = None) -> str:
    """Run `ens ARGS` in ``workdir`` as a user would; echo its output; fail with its last line.

    ``threads``: PyTorch's and MKL's thread counts in that process (OMP_NUM_THREADS,
    MKL_NUM_THREADS), for `ens export`, whose check against torch prints differences that
    follow them.
    """
    log("  $ ens " + " ".join(args))
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "ensemble", *args], cwd=workdir, capture_output=True, text=True,
                          env=env)
    for line in proc.stdout.splitlines():
        log("    " + line)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise EnsError(f"`ens {args[0]}` failed in the demo (exit {proc.returncode}): {last}")
    return proc.stdout


def _competition(workdir: Path, spec: DemoSpec) -> tuple[Competition, bool]:
    """The demo competition, generated once per spec and ranges of the digits (a marker file
    records which)."""
    root = workdir / "data"
    marker = workdir / "data.spec.json"
    ranges = {str(d): [asdict(r) for r in regions] for d, regions in RANGES.items()}
    wanted = json.dumps({**asdict(spec), "ranges": ranges}, sort_keys=True)
    answers = workdir / "data_answers.csv"
    if marker.is_file() and marker.read_text() == wanted and answers.is_file():
        counts = {s: len(read_json(root / f"{s}2019.json")["images"]) for s in ("train", "val", "test")}
        return Competition(root=root, answers=answers, counts=counts), False
    marker.unlink(missing_ok=True)
    competition = make_competition(root, spec)
    marker.write_text(wanted)
    return competition, True


def _answers(path: Path) -> dict[int, int]:
    with open(path, newline="") as fh:
        return {int(r["id"]): int(r["category_id"]) for r in csv.DictReader(fh)}


def _error(ids: Sequence[int], predicted: Sequence[int], answers: dict[int, int]) -> float:
    return float(np.mean([answers[i] != p for i, p in zip(ids, predicted)]))


def run_demo(workdir: Path = Path(".demo"), settings: DemoSettings = DemoSettings(),
             log: Callable[[str], None] = print) -> DemoResult:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)

    t = _step(log, 1, "data: scikit-learn digits drawn on textured canvases, iNat 2019 layout, "
                      "iNat 2021's places and dates")
    competition, made = _competition(workdir, settings.spec)
    log(f"  {'wrote' if made else 'reused'} {competition.root}: {competition.counts['train']} train, "
        f"{competition.counts['val']} val, {competition.counts['test']} test images "
        f"({time.perf_counter() - t:.1f} s)")

    t = _step(log, 2, f"train: {len(settings.recipes)} architectures on the CPU, {settings.threads} PyTorch "
                      f"thread{'s' if settings.threads != 1 else ''} (cached between runs)")
    trained = train_all(settings.recipes, competition.root, workdir / "checkpoints", log, settings.threads)
    for recipe, path, now in trained:
        log(f"  {'trained' if now else 'reused'} {path} ({recipe.save_as}, {recipe.epochs} epochs)")
    log(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step(log, 3, "ens export: each checkpoint to a verified ONNX file")
    models = []
    for recipe, path, _ in trained:
        args = ["export", str(path.relative_to(workdir)), "--input-size", str(recipe.input_size),
                "--classes", "data/train2019.json", "--resize", "squash"]
        if recipe.needs_arch:
            args += ["--arch", recipe.arch]
        if recipe.save_as == "whole-model":
            args.append("--trust-pickle")  # the demo made this pickle itself
        _ens(workdir, args, log, threads=settings.threads)
        models.append(path.with_suffix(".onnx").relative_to(workdir))
    log(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step(log, 4, f"ens infer: every model on val and test with TTA {settings.tta}")
    _ens(workdir, ["infer", *map(str, models), "--data", "data", "--split", "val,test", "--tta", settings.tta], log)
    log(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step(log, 5, "ens blend: weights fitted on val, cross-validated, applied to test; then corrected for "
                      "the long-tailed training prior, and for where and when each image was taken; ens report "
                      "explains it")
    # --models: blend this run's models only, not stores an earlier demo left in runs/.
    names = ",".join(Path(m).stem for m in models)
    fit = ["blend", "--optimize", "val", "--data", "data", "--models", names, "--cv", str(settings.cv)]
    _ens(workdir, [*fit, "--out", "blends/plain"], log)
    _ens(workdir, [*fit, "--prior", "data/train2019.json", "--out", "blends/demo"], log)
    _ens(workdir, [*fit, "--prior", "data/train2019.json", "--geo-prior", "data/train2019.json",
                   "--out", "blends/geo"], log)
    blend = BlendRecord.read(workdir / "blends/geo/blend.json")
    _ens(workdir, ["report", "blends/geo"], log)
    report = workdir / "blends/geo/report.html"
    log(f"  the blend explained, one page to open in a browser: {report}")
    log(f"  ({time.perf_counter() - t:.1f} s)")

    t = _step(log, 6, "ens submit --dry-run: a checked Kaggle CSV, recorded in the ledger")
    out = _ens(workdir, ["submit", "blends/geo", "--data", "data", "--dry-run", "--name", "demo",
                         "--sample", "data/kaggle_sample_submission.csv"], log)
    submission = workdir / out.split("wrote ", 1)[1].split(" (", 1)[0]
    log(f"  ({time.perf_counter() - t:.1f} s)")

    # Scoring: only the demo holds the test answers.
    answers = _answers(competition.answers)
    with open(submission, newline="") as fh:
        rows = list(csv.DictReader(fh))
    test_error = {blend.cv.chosen: _error([int(r["id"]) for r in rows],
                                          [int(r["predicted"].split()[0]) for r in rows], answers)}
    test_error |= _other_test_errors(workdir, competition, [Path(m).stem for m in models], blend, answers)
    table = tuple(Row(r.name, r.top1, r.top1_low, r.top1_high, test_error[r.name])
                  for r in blend.cv.rows if r.name in test_error)
    return DemoResult(rows=table, submission=submission, method=blend.cv.chosen,
                      seconds=time.perf_counter() - start, report=report)


def _other_test_errors(workdir: Path, competition: Competition, models: Sequence[str], blend: BlendRecord,
                       answers: dict[int, int]) -> dict[str, float]:
    """Test top-1 error of each model, of uniform weights and of the nll blend, each without
    (blends/plain) and with the prior correction (blends/demo; uniform's tau fitted here on val,
    as `ens blend --method uniform --prior` would)."""
    import weights_search as ws
    from ensemble.formats.dataset import load_labels
    from ensemble.formats.store import read_store

    def stack(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stores = [read_store(workdir / "runs" / m / split) for m in models]
        return np.stack([np.asarray(s.logits, dtype=np.float32) for s in stores]), stores[0].ids, \
            np.asarray(stores[0].class_ids)

    test, ids, class_ids = stack("test")
    ids = [int(i) for i in ids]

    def error(log_probs: np.ndarray) -> float:
        return _error(ids, class_ids[log_probs.argmax(1)], answers)

    errors = {m: error(lp) for m, lp in zip(models, ws.log_softmax(test))}
    uniform = ws.FittedBlend("uniform", ws.MIXTURE, (1 / len(models),) * len(models))
    errors["uniform"] = error(uniform.log_proba(test))
    plain = BlendRecord.read(workdir / "blends/plain/blend.json")
    errors[plain.cv.chosen] = error(plain.fitted().log_proba(test))
    corrected = BlendRecord.read(workdir / "blends/demo/blend.json")
    errors[corrected.cv.chosen] = error(corrected.fitted().log_proba(test))
    val, val_ids, _ = stack("val")
    labels = load_labels(competition.root / "val2019.json", val_ids, class_ids.tolist())
    prior = ws.LogitAdjustment(blend.prior.log_prior())
    errors["uniform" + ws.PRIOR_SUFFIX] = error(ws.fit_blend(val, labels, "uniform", prior=prior).log_proba(test))
    return errors


def format_table(result: DemoResult, cv_folds: int) -> list[str]:
    """The demo's closing table: CV top-1 on validation and top-1 error on test, per row."""
    labels = [f"{r.name} (blend)" if r.name == result.method and r.name != "uniform" else r.name
              for r in result.rows]
    width = max(map(len, labels)) + 2
    header = f"CV top-1 on val ({cv_folds}-fold, 95% interval)"
    lines = [f"{'':<{width}}{header:<{len(header) + 2}}{'top-1 error on test':>19}"]
    for label, row in zip(labels, result.rows):
        cv = f"{row.cv_top1:.3f} [{row.cv_low:.3f}, {row.cv_high:.3f}]"
        lines.append(f"{label:<{width}}{cv:<{len(header) + 2}}{row.test_error:>19.3f}")
    lines.append(f"submission: {result.submission}")
    return lines
