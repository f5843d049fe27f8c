"""Export time per architecture, and ONNX Runtime (CPU) against torch eager on the same batch.

    .venv/bin/python -m benchmarks.export            # the architectures of the issue, 224/299 px
    .venv/bin/python -m benchmarks.export --quick    # three small ones at 128 px

For each architecture: the time of `ens export` (checkpoint loading, tracing, onnx.checker,
verification at two sizes, writing), then images/s of the exported graph in onnxruntime and
of the same network in torch eager mode (float32, inference mode), both fed the same uint8
batch and both doing the normalisation, measured in this run. Weights are random: speed does
not depend on them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from exporters import ExportOptions, export_checkpoint
from exporters.onnx_export import UInt8NHWC, IMAGENET_MEAN, IMAGENET_STD
from ensemble.inference.runtime import onnxruntime

ort = onnxruntime()

FULL = ["mnasnet1_0", "inception_v3", "wide_resnet50_2", "resnet50", "efficientnet_b0",
        "mobilenet_v3_large", "convnext_tiny"]
QUICK = ["mnasnet1_0", "resnet50", "efficientnet_b0"]


def _throughput(fn, images, min_seconds: float) -> float:
    fn(images)  # warm-up: allocations, kernel selection
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or runs < 2:
        fn(images)
        runs += 1
    return runs * len(images) / elapsed


def bench(arch: str, size: int | None, batch: int, min_seconds: float, folder: Path) -> dict:
    kwargs = {"init_weights": False} if arch == "inception_v3" else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=1010, **kwargs).eval()
    ckpt = folder / f"{arch}.pth"
    torch.save(model.state_dict(), ckpt)
    start = time.perf_counter()
    result = export_checkpoint(ckpt, options=ExportOptions(arch=arch, input_size=size))
    export_s = time.perf_counter() - start
    size = result.metadata.input_size

    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ort_ips = _throughput(lambda x: session.run(["logits"], {"image": x}), images, min_seconds)

    wrapper = UInt8NHWC(model, IMAGENET_MEAN, IMAGENET_STD).eval()
    tensor = torch.from_numpy(images)

    def eager(x):
        with torch.inference_mode():
            return wrapper(x)

    torch_ips = _throughput(eager, tensor, min_seconds)
    return {"arch": arch, "size": size, "export_s": export_s, "mb": result.path.stat().st_size / 1e6,
            "ort": ort_ips, "torch": torch_ips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three small architectures at 128 px")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    parser.add_argument("--arch", action="append", help="architectures to run (repeatable)")
    args = parser.parse_args()
    archs = args.arch or (QUICK if args.quick else FULL)
    size = 128 if args.quick else None
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
          f"batch {args.batch}, 1010 classes")
    header = f"{'architecture':<20}{'size':>6}{'export s':>10}{'MB':>8}{'ORT img/s':>11}{'torch img/s':>13}{'ORT/torch':>11}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            row = bench(arch, size, args.batch, args.seconds, Path(tmp))
            print(f"{row['arch']:<20}{row['size']:>6}{row['export_s']:>10.1f}{row['mb']:>8.1f}"
                  f"{row['ort']:>11.1f}{row['torch']:>13.1f}{row['ort'] / row['torch']:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
