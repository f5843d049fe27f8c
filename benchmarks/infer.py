"""`ens infer` end to end against the models alone and against a plain torch DataLoader loop.

    .venv/bin/python -m benchmarks.infer            # 512 images
    .venv/bin/python -m benchmarks.infer --quick    # 64 images
    .venv/bin/python -m benchmarks.infer --engine ray --skip-torch   # the Ray engine against the local one

On a generated iNaturalist-like set (JPEGs, longest side 800 px, the usual photo aspect ratios,
photo-like content at quality 90) and two exported networks (resnet50 and mnasnet1_0, 1010
classes, 224 px, random weights: speed does not depend on them), with ``--tta`` (flip by
default), all measured in this one run:

* model only: the same onnxruntime sessions (ens's own :class:`~ensemble.inference.runtime.Runner`) on
  preloaded uint8 batches, one pass of ``--batch`` images per view as ens infer runs them, no
  decoding, no files;
* ens infer: :func:`ensemble.inference.run.infer` in this process, the whole run: decoding workers,
  sessions, chunks and stores (each run writes a fresh store). "loop" leaves out the start
  (sessions, worker start) and the store assembly, which do not grow with the data set;
* torch loop: torchvision models in eval / inference mode, a DataLoader decoding with PIL and
  torchvision transforms (Resize 256, CenterCrop 224, ToTensor, Normalize), one forward pass
  per model and view, as a plain script would do it.

With ``--engine ray``: ``ens infer --engine ray`` on a local Ray cluster started in this process
(all of this machine's cores; its start-up timed and reported apart, not in the runs) against
the local engine, runs interleaved, the same images, models and views.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ensemble.formats.dataset import load_split
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.runtime import Runner, cpu_threads, load_model
from ensemble.formats.store import read_store
from ensemble.inference.tta import plan_views, view_size

ARCHS = ("resnet50", "mnasnet1_0")
#: End to end on the CPU against the sessions alone (issue 14).
GOAL = 1.07
#: The Ray engine's whole run against the local engine's (issue 16).
RAY_GOAL = 1.3
#: (width, height) ratios of iNat photos, with rough frequencies: mostly 4:3 landscape.
ASPECTS = [((4, 3), 0.45), ((3, 4), 0.2), ((3, 2), 0.15), ((1, 1), 0.1), ((2, 3), 0.05), ((16, 9), 0.05)]


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs under ``folder``, longest side 800 (a few smaller), and a COCO json."""
    import json

    rng = np.random.default_rng(seed)
    ratios = [a for a, _ in ASPECTS]
    weights = np.array([w for _, w in ASPECTS])
    images = []
    (folder / "test2019").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (rw, rh) = ratios[rng.choice(len(ratios), p=weights / weights.sum())]
        longest = 800 if rng.random() < 0.9 else int(rng.integers(400, 800))
        w, h = (longest, round(longest * rh / rw)) if rw >= rh else (round(longest * rw / rh), longest)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.int16)
        pixels = np.clip(smooth + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        name = f"test2019/{i:06d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        images.append({"id": 268243 + i, "width": w, "height": h, "file_name": name})
    (folder / "test2019.json").write_text(json.dumps({"images": images}))
    return folder / "test2019.json"


def export_models(folder: Path) -> list[Path]:
    import torch
    import torchvision

    from exporters import ExportOptions, export_checkpoint

    paths = []
    for arch in ARCHS:
        out = folder / f"{arch}.onnx"
        if not out.exists():
            torch.manual_seed(0)
            model = torchvision.models.get_model(arch, weights=None, num_classes=1010).eval()
            torch.save(model.state_dict(), folder / f"{arch}.pth")
            export_checkpoint(folder / f"{arch}.pth", out, ExportOptions(arch=arch, input_size=224))
        paths.append(out)
    return paths


def model_only(paths: list[Path], count: int, batch: int, tta: tuple[str, ...]) -> float:
    """Seconds for the sessions alone on ``count`` images: one pass of ``batch`` preloaded
    images per view and model, as ens infer runs them."""
    runners = [Runner(load_model(p), "cpu") for p in paths]
    sizes = [view_size(load_model(paths[0]).preprocess, v) for v in plan_views(tta)]  # both models: 224 px
    arrays = {s: np.random.default_rng(0).integers(0, 256, (batch, s, s, 3), dtype=np.uint8) for s in set(sizes)}
    for runner in runners:
        runner.warm_up(batch, sizes)  # memory arenas, kernel choice
    start = time.perf_counter()
    for _ in range(-(-count // batch)):
        for runner in runners:
            for s in sizes:
                runner(arrays[s])
    return time.perf_counter() - start


def ens_infer(paths: list[Path], index: Path, out: Path, batch: int, workers: int | None,
              tta: tuple[str, ...], engine: str = "local") -> tuple[float, float, int]:
    """(wall seconds, loop seconds, decoding processes) of one `ens infer` run."""
    shutil.rmtree(out, ignore_errors=True)
    split = load_split(index)
    start = time.perf_counter()
    result = infer(paths, [split], InferOptions(tta=tta, batch_size=batch, workers=workers, out=out, engine=engine))
    wall = time.perf_counter() - start
    loop = read_store(result.stores[0].path).manifest.figures.seconds
    return wall, loop, result.workers


def torch_loop(folder: Path, index: Path, count: int, batch: int, workers: int) -> float:
    import torch
    import torchvision
    from torchvision import transforms

    split = load_split(index)
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            return transform(Image.open(split.paths[i]).convert("RGB"))

    models = []
    for arch in ARCHS:
        model = torchvision.models.get_model(arch, weights=None, num_classes=1010).eval()
        model.load_state_dict(torch.load(folder / f"{arch}.pth"))
        models.append(model)
    loader = torch.utils.data.DataLoader(Images(), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            for model in models:
                for view in (x, torch.flip(x, dims=[3])):
                    model(view)
    return time.perf_counter() - start


def ray_against_local(paths: list[Path], index: Path, work: Path, count: int, batch: int, workers: int | None,
                      tta: tuple[str, ...], repeat: int) -> None:
    """The Ray engine's runs against the local engine's, interleaved, best of each."""
    import logging

    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    startup = time.perf_counter() - start
    resources = ray.cluster_resources()
    print(f"Ray {ray.__version__}: a local cluster of {resources.get('CPU', 0):.0f} CPUs, "
          f"{resources.get('GPU', 0):.0f} GPUs, started in {startup:.1f} s (not in the runs below)")
    try:
        runs: dict[str, list] = {"local": [], "ray": []}
        for _ in range(repeat):
            for engine in runs:
                runs[engine].append(ens_infer(paths, index, work / "runs", batch, workers, tta, engine))
            print(f"  local {runs['local'][-1][0]:6.2f} s, ray {runs['ray'][-1][0]:6.2f} s "
                  f"(loops {runs['local'][-1][1]:6.2f} s, {runs['ray'][-1][1]:6.2f} s)")
    finally:
        ray.shutdown()
    local = min(r[0] for r in runs["local"])
    print(f"\n{'':36} {'seconds':>8} {'images/s':>9} {'vs local':>9}")
    for engine, label in (("local", "local engine, whole run"), ("ray", "ray engine, whole run")):
        wall, loop = min(r[0] for r in runs[engine]), min(r[1] for r in runs[engine])
        print(f"{label:36} {wall:8.2f} {count / wall:9.2f} {wall / local:8.2f}x")
        print(f"{f'  its loop ({runs[engine][0][2]} decoding)':36} {loop:8.2f} {count / loop:9.2f}")
    ratio = min(r[0] for r in runs["ray"]) / local
    print(f"\ngoal: the Ray engine within {RAY_GOAL:.2f}x of the local engine: {ratio:.2f}x, "
          f"{'met' if ratio <= RAY_GOAL else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images instead of 512")
    parser.add_argument("--images", type=int, help="number of images (overrides --quick)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, help="ens decoding processes [default: ens's own]")
    parser.add_argument("--work", type=Path, help="keep images and models here between runs")
    parser.add_argument("--repeat", type=int, default=3, help="runs of model-only and ens infer; the best counts")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--tta", default="flip", help="ens infer's --tta (the torch loop always does flip)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: the Ray engine against the local engine instead of the model-only and torch runs")
    args = parser.parse_args()
    count = args.images or (64 if args.quick else 512)
    tta = tuple(t for t in args.tta.split(",") if t)

    from ensemble.inference.runtime import onnxruntime

    ort = onnxruntime()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        index = work / f"images{count}" / "test2019.json"
        start = time.perf_counter()
        if not index.exists():
            make_images(index.parent, count)
        sizes = [p.stat().st_size for p in load_split(index).paths]
        print(f"{count} JPEGs, longest side 800, mean {np.mean(sizes) / 1e3:.0f} kB "
              f"(ready in {time.perf_counter() - start:.0f} s)")
        start = time.perf_counter()
        paths = export_models(work)
        print(f"models: {', '.join(ARCHS)} at 224 px, 1010 classes (ready in {time.perf_counter() - start:.0f} s)")
        print(f"{cpu_threads()} cores; onnxruntime {ort.__version__}, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); batch {args.batch}, tta {args.tta}\n")

        if args.engine == "ray":
            ray_against_local(paths, index, work, count, args.batch, args.workers, tta, args.repeat)
            return
        # Interleaved repeats, best of each: other processes on a shared machine only slow runs down.
        bases, runs = [], []
        for _ in range(args.repeat):
            bases.append(model_only(paths, count, args.batch, tta))
            runs.append(ens_infer(paths, index, work / "runs", args.batch, args.workers, tta))
            print(f"  model only {bases[-1]:6.2f} s, ens infer {runs[-1][0]:6.2f} s (loop {runs[-1][1]:6.2f} s)")
        base = min(bases)
        wall, loop, workers = min(runs)[0], min(r[1] for r in runs), runs[0][2]
        ratios = [r[0] / b for r, b in zip(runs, bases)]
        print(f"  whole run / model only, pair by pair: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {float(np.median(ratios)):.2f})")
        print(f"  goal (CPU): whole run within {GOAL:.2f}x of model only: best {wall / base:.2f}x, "
              f"{'met' if wall / base <= GOAL else 'not met'}\n")
        rows = [("model only (preloaded arrays)", base), (f"ens infer, loop ({workers} decoding)", loop),
                ("ens infer, whole run", wall)]
        if not args.skip_torch:
            rows.append(("torch + DataLoader", torch_loop(work, index, count, args.batch, max(1, workers))))
        print(f"{'':34} {'seconds':>8} {'images/s':>9} {'vs model only':>14}")
        for name, seconds in rows:
            print(f"{name:34} {seconds:8.2f} {count / seconds:9.2f} {seconds / base:13.2f}x")
        if not args.skip_torch:
            print(f"\nens infer (whole run) is {rows[-1][1] / wall:.1f}x faster than the torch loop")


if __name__ == "__main__":
    main()
