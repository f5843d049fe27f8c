"""Decoding one image into every view of a run: ens's decode against the whole-canvas baseline.

    .venv/bin/python -m benchmarks.decode            # 128 images
    .venv/bin/python -m benchmarks.decode --quick    # 32 images

On a generated iNaturalist-like set (JPEGs, longest side 800 px, iNat's mix of aspect ratios;
:func:`benchmarks.infer.make_images`), one core, for the model mixes below, measured in this one
run and in turns:

* baseline: what ens did before (and what a torchvision ``Resize`` + ``CenterCrop`` does):
  decode once per model's JPEG reduction, resize the whole image onto each canvas, cut the
  crops;
* ens: :func:`ensemble.inference.decode.decode_image`, the same decodes, each canvas resized
  only over the part its crops cut (:func:`ensemble.inference.decode.resize_region`).

It prints milliseconds per image and images/s of one core for both, their ratio, and how far
ens's pixels are from the baseline's (largest difference in levels, share of pixels that
differ). One core's decode rate bounds a GPU's: with ``W`` decoding processes a GPU gets at
most ``W x`` that rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.infer import make_images
from ensemble.formats.dataset import load_split
from ensemble.inference.decode import RESAMPLE, decode_image, load_image
from ensemble.inference.tta import Preprocess, canvas_shape, crop, geometries, plan_views

#: (label, models as (input size, interpolation), --tta)
MIXES = [
    ("one 224 px model, flip", [(224, "bilinear")], ("flip",)),
    ("224 + 299 + 448 px, flip", [(224, "bilinear"), (299, "bicubic"), (448, "bicubic")], ("flip",)),
    ("224 + 299 + 448 px, flip,scale", [(224, "bilinear"), (299, "bicubic"), (448, "bicubic")], ("flip", "scale")),
    ("one 560 px model, scale", [(560, "bicubic")], ("scale",)),
    ("one 224 px model, crop10", [(224, "bilinear")], ("crop10",)),
]


def run_geometries(models, tta):
    views = plan_views(tta)
    return tuple(dict.fromkeys(g for size, interp in models
                               for g in geometries(Preprocess(size, "center-crop", 0.875, interp), views)))


def baseline(path, geos):
    """Each model's decode, each canvas resized whole, then cropped (the reference pixels)."""
    images, canvases, out = {}, {}, {}
    for g in geos:
        image = images.get(g.min_side)
        if image is None:
            image = images[g.min_side] = load_image(path, g.min_side)
        key = (image.size, g.canvas, g.canvas_size, g.interpolation)
        if key not in canvases:
            height, width = canvas_shape(image.height, image.width, g.canvas, g.canvas_size)
            canvases[key] = np.asarray(image.resize((width, height), RESAMPLE[g.interpolation]))
        out[g] = crop(canvases[key], g.size, g.position)
    return out


def timed(function, paths, geos):
    start = time.perf_counter()
    for path in paths:
        function(path, geos)
    return (time.perf_counter() - start) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images instead of 128")
    parser.add_argument("--repeat", type=int, default=3, help="turns of each; the best counts")
    args = parser.parse_args()
    count = 32 if args.quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        index = make_images(Path(tmp), count)
        paths = [str(p) for p in load_split(index).paths]
        print(f"{count} iNat-like JPEGs, longest side 800 px; one core; best of {args.repeat}\n")
        print(f"{'':32} {'baseline ms':>11} {'ens ms':>7} {'ens img/s':>9} {'speed-up':>8} "
              f"{'max diff':>8} {'pixels differ':>13}")
        for label, models, tta in MIXES:
            geos = run_geometries(models, tta)
            base = ens = float("inf")
            for _ in range(args.repeat):  # in turns: load on a shared machine slows both alike
                base = min(base, timed(baseline, paths, geos))
                ens = min(ens, timed(decode_image, paths, geos))
            worst, differ, total = 0, 0, 0
            for path in paths:
                want, got = baseline(path, geos), decode_image(path, geos)
                for g in geos:
                    diff = np.abs(want[g].astype(np.int16) - got[g])
                    worst, differ, total = max(worst, int(diff.max())), differ + int((diff > 0).sum()), total + diff.size
            print(f"{label:32} {base * 1e3:11.1f} {ens * 1e3:7.1f} {1 / ens:9.0f} {base / ens:7.2f}x "
                  f"{worst:8d} {100 * differ / total:12.3f}%")


if __name__ == "__main__":
    main()
