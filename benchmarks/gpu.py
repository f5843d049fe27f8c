"""The GPU path in one run: onnxruntime CUDA against torch, the whole `ens infer`, decoding.

    python -m benchmarks.gpu            # on a GPU machine (onnxruntime-gpu and torch with CUDA): < 8 min
    python -m benchmarks.gpu --cpu      # small sizes on the CPU providers (the test suite runs this)

Everything below is measured in this one run, on the same device:

1. **Models alone**, resnet50 and mnasnet1_0 (1010 classes, random weights: speed does not
   depend on them) at 224 and 560 px, batch 32: images/s of the exported graph in onnxruntime
   (fp32, and the ``--fp16`` export) fed uint8 NHWC as ``ens infer`` feeds it, against torch
   eager fp32 (NCHW float, already normalised) and torch with channels-last + autocast fp16.
2. **The whole `ens infer`** on a generated iNat-like set (JPEGs up to 800 px): 3 models at
   448 px with ``--tta flip,scale``: images/s, and the ratio to the time the same sessions take
   on preloaded arrays of the same shapes (model only).
3. **Decoding** images/s with all cores: ens's decoder alone, for the geometries of run 2.

``--cpu`` runs the same code on the CPU providers with small networks (resnet18, squeezenet1_1),
small sizes and few images, so the script cannot rot where no GPU is; its figures say nothing
about a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.infer import make_images
from ensemble.formats.dataset import load_split
from ensemble.inference.decode import Decoder
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.runtime import Runner, cpu_threads, load_model
from ensemble.inference.tta import geometries, plan_views, view_size
from ensemble.formats.store import read_store

GPU = {"archs": ("resnet50", "mnasnet1_0"), "sizes": (224, 560), "batch": 32, "seconds": 3.0,
       "run_archs": ("resnet50", "mnasnet1_0", "efficientnet_b0"), "run_size": 448, "images": 1024}
CPU = {"archs": ("resnet18", "squeezenet1_1"), "sizes": (32, 48), "batch": 4, "seconds": 0.2,
       "run_archs": ("resnet18", "squeezenet1_1", "mnasnet0_5"), "run_size": 32, "images": 16}
TTA = ("flip", "scale")


def export(arch: str, folder: Path, size: int, fp16: bool = False) -> Path:
    """An ens export of a torchvision ``arch`` with random weights (seed 0)."""
    import torch
    import torchvision

    from exporters import ExportOptions, export_checkpoint

    out = folder / f"{arch}-{size}{'.fp16' if fp16 else ''}.onnx"
    if not out.exists():
        checkpoint = folder / f"{arch}.pth"
        if not checkpoint.exists():
            torch.manual_seed(0)
            model = torchvision.models.get_model(arch, weights=None, num_classes=1010).eval()
            torch.save(model.state_dict(), checkpoint)
        export_checkpoint(checkpoint, out, ExportOptions(arch=arch, input_size=size, fp16=fp16))
    return out


def rate(fn, images: int, seconds: float, sync=lambda: None) -> float:
    """Images/s of ``fn()`` (``images`` per call), after two warm-up calls, over >= ``seconds``."""
    fn()
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * images / elapsed


def models_alone(cfg: dict, device: str, folder: Path) -> list[tuple]:
    import torch
    import torchvision

    torch_device = "cuda" if device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    amp = torch.float16 if torch_device == "cuda" else torch.bfloat16
    batch, seconds = cfg["batch"], cfg["seconds"]
    rows = []
    for arch in cfg["archs"]:
        fp32 = Runner(load_model(export(arch, folder, cfg["sizes"][0])), device, images=batch, sizes=cfg["sizes"])
        fp16 = Runner(load_model(export(arch, folder, cfg["sizes"][0], fp16=True)), device, images=batch,
                      sizes=cfg["sizes"])
        model = torchvision.models.get_model(arch, weights=None, num_classes=1010).eval().to(torch_device)
        last = torchvision.models.get_model(arch, weights=None, num_classes=1010).eval().to(torch_device)
        last = last.to(memory_format=torch.channels_last)
        for size in cfg["sizes"]:
            pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            x = torch.randn(batch, 3, size, size, device=torch_device)
            x_last = x.contiguous(memory_format=torch.channels_last)

            def eager():
                with torch.inference_mode():
                    model(x)

            def channels_last_amp():
                with torch.inference_mode(), torch.autocast(torch_device, dtype=amp):
                    last(x_last)

            rows.append((arch, size, rate(lambda: fp32(pixels), batch, seconds),
                         rate(lambda: fp16(pixels), batch, seconds), rate(eager, batch, seconds, sync),
                         rate(channels_last_amp, batch, seconds, sync)))
            print(f"  {arch:16} {size:4d} px {rows[-1][2]:9.1f} {rows[-1][3]:9.1f} {rows[-1][4]:9.1f} "
                  f"{rows[-1][5]:9.1f}   {rows[-1][2] / rows[-1][4]:5.2f}x {rows[-1][3] / rows[-1][5]:5.2f}x",
                  flush=True)
    return rows


def whole_run(cfg: dict, device: str, folder: Path, index: Path) -> tuple[float, float, float]:
    """(images/s of `ens infer`, images/s of the same sessions on preloaded arrays, ratio)."""
    paths = [export(arch, folder, cfg["run_size"]) for arch in cfg["run_archs"]]
    split = load_split(index)
    batch = cfg["batch"]
    out = folder / "runs"
    shutil.rmtree(out, ignore_errors=True)
    options = InferOptions(tta=TTA, batch_size=batch, device=device, out=out)
    start = time.perf_counter()
    result = infer(paths, [split], options)
    wall = time.perf_counter() - start
    loop = read_store(result.stores[0].path).manifest.figures.seconds

    views = plan_views(TTA)
    batches = -(-len(split) // batch)
    base = 0.0
    for path in paths:
        model = load_model(path)
        sizes = [view_size(model.preprocess, v) for v in views]
        runner = Runner(model, device, images=batch, sizes=sizes)
        arrays = {s: np.random.default_rng(0).integers(0, 256, (batch, s, s, 3), dtype=np.uint8) for s in set(sizes)}
        runner.warm_up(batch, sizes)
        start = time.perf_counter()
        for _ in range(batches):
            for s in sizes:  # one pass per view, as ens infer runs them
                runner(arrays[s])
        base += time.perf_counter() - start
    print(f"  ens infer: {len(split)} images, {len(paths)} models x {len(views)} views on {result.provider}, "
          f"{result.workers} decoding processes: whole run {wall:.1f} s, loop {loop:.1f} s; model only {base:.1f} s")
    return len(split) / wall, len(split) / base, loop / base


def decoding(cfg: dict, folder: Path, index: Path) -> float:
    """Images/s of ens's decoder alone, all cores, the geometries of the whole run."""
    views = plan_views(TTA)
    geos = tuple(dict.fromkeys(g for arch in cfg["run_archs"]
                               for g in geometries(load_model(export(arch, folder, cfg["run_size"])).preprocess,
                                                   views)))
    split = load_split(index)
    batch = cfg["batch"]
    chunks = [(lo, split.paths[lo:lo + batch]) for lo in range(0, len(split), batch)]
    with Decoder(geos, batch, workers=cpu_threads()) as decoder:
        list(decoder.map(chunks[:decoder.prefetch]))  # the workers are up and have imported Pillow
        start = time.perf_counter()
        for _ in decoder.map(chunks):
            pass
        return len(split) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU providers (for the tests)")
    parser.add_argument("--images", type=int, help="images of the generated set")
    parser.add_argument("--work", type=Path, help="keep images and models here between runs")
    args = parser.parse_args(argv)
    cfg = dict(CPU if args.cpu else GPU)
    if args.images:
        cfg["images"] = args.images

    from ensemble.inference.runtime import onnxruntime

    ort = onnxruntime()
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit("onnxruntime offers no CUDAExecutionProvider: install onnxruntime-gpu (see docs/gpu.md)")
        if not torch.cuda.is_available():
            sys.exit("torch sees no CUDA device: install a CUDA build of torch, or run with --cpu")
        name = torch.cuda.get_device_name(0)
    else:
        name = "CPU"
    print(f"{name}; {cpu_threads()} cores; onnxruntime {ort.__version__} ({ort.get_device()}), "
          f"torch {torch.__version__}; batch {cfg['batch']}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        index = work / f"images{cfg['images']}" / "test2019.json"
        if not index.exists():
            make_images(index.parent, cfg["images"])

        print(f"\n1. models alone, images/s (torch amp: {'fp16' if device == 'cuda' else 'bf16'} autocast)")
        print(f"  {'':16} {'size':>7} {'ORT fp32':>9} {'ORT fp16':>9} {'torch':>9} {'torch amp':>9}"
              f"   ORT fp32/torch, ORT fp16/torch amp")
        models_alone(cfg, device, work)

        print(f"\n2. the whole ens infer: {', '.join(cfg['run_archs'])} at {cfg['run_size']} px, "
              f"--tta {','.join(TTA)}")
        ens_rate, model_rate, ratio = whole_run(cfg, device, work, index)
        print(f"  ens infer {ens_rate:.1f} images/s (whole run); model only {model_rate:.1f} images/s; "
              f"loop / model only {ratio:.2f}x")

        print(f"\n3. decoding alone, {cpu_threads()} processes: {decoding(cfg, work, index):.1f} images/s")
        print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
