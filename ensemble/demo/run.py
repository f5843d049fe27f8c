"""`make demo`: the pipeline's public commands run on a small generated input.

Until the full demo lands (training on real images, inference, blending, submission), this
runs what exists: it saves checkpoints of three architectures the ways users save them and
turns each into a verified ONNX file with the public `ens export` command, then shows what
one of them says about itself with `ens info`. The checkpoints have random weights: the
point is the export path, not accuracy. Everything lands in `.demo/` (ignored by git).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(".demo")
NUM_CLASSES = 10
SIZE = 96


def _checkpoints(folder: Path) -> list[tuple[Path, list[str]]]:
    """Save three checkpoints in three forms; return (path, extra `ens export` arguments)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    made = []
    resnet = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    path = folder / "resnet18_ddp.pth"  # DataParallel training: every key starts with module.
    torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    made.append((path, ["--arch", "resnet18"]))

    mnasnet = torchvision.models.mnasnet0_5(num_classes=NUM_CLASSES).eval()
    path = folder / "mnasnet0_5_whole.pt"  # torch.save(model): a whole pickled module
    torch.save(mnasnet, path)
    made.append((path, []))

    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES).eval()
    path = folder / "mobilenet_v3_small_ts.pt"  # a TorchScript archive
    torch.jit.script(mobilenet).save(str(path))
    made.append((path, ["--fp16"]))
    return made


def _ens(*args: str) -> None:
    command = [sys.executable, "-m", "ensemble", *args]
    print("$ ens " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    start = time.perf_counter()
    folder = ROOT / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"saving three checkpoints ({NUM_CLASSES} classes, random weights) in {folder}/", flush=True)
    exported = []
    for path, extra in _checkpoints(folder):
        _ens("export", str(path), "--input-size", str(SIZE), *extra)
        exported.append(path.with_suffix(".fp16.onnx" if "--fp16" in extra else ".onnx"))
    _ens("info", str(exported[0]))
    print(f"demo finished in {time.perf_counter() - start:.0f} s: {len(exported)} verified ONNX files in {folder}/")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
