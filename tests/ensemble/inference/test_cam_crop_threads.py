"""The cam view's crops resized on threads (:meth:`Forward.cam_crops`): the same bytes as one row
after another, rows really resized at once, and no thread left behind."""

from __future__ import annotations

import pickle
import threading

import numpy as np
from PIL import Image

from ensemble.formats.dataset import load_split
from ensemble.inference.cam import CamSettings, cam_box, to_image
from ensemble.inference.decode import decode_batch
from ensemble.inference.forward import CamPlan, Forward
from ensemble.inference.run import InferOptions, infer
from ensemble.inference.tta import Preprocess, View, cam_source

from tests.ensemble.inference.test_infer_cam import cam_onnx, pasted

BATCH = 8
SIZE = 64


def _crop_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("ens-crop")}


def _batch(tmp_path, places, bad=()):
    """A decoded batch of ``BATCH`` rows: the photo pasted at ``places`` on canvases of several
    sizes, the rows in ``bad`` unreadable files, the rest padding; its cam plan and random maps."""
    folder = pasted(tmp_path / f"images{len(places)}-{bad}", places, canvas=(300, 220))
    paths = sorted(str(p) for p in folder.iterdir())
    for i, path in enumerate(paths):
        if i % 2:  # other sizes: other regions and boxes per row
            Image.open(path).resize((240 + 40 * i, 330)).save(path)
    for row in bad:
        with open(paths[row], "wb") as f:
            f.write(b"not an image")
    source = cam_source(Preprocess(SIZE, "center-crop", 0.875), (View(), View(cam=True)))
    decoded = decode_batch(0, paths, BATCH, [], sources=[source])
    assert [row for row, _ in decoded.bad] == list(bad)
    plan = CamPlan(source, CamSettings(), SIZE, rows=(1,), flips=(False,))
    maps = np.random.default_rng(len(places)).random((BATCH, 7, 7)).astype(np.float32)
    return decoded, plan, maps


def _reference(decoded, plan, maps):
    """The crops and boxes cut one row after another, straight from PIL."""
    source = decoded.sources[plan.source]
    crops = np.zeros((BATCH, SIZE, SIZE, 3), np.uint8)
    boxes = np.zeros((decoded.count, 4), np.float32)
    bad = {row for row, _ in decoded.bad}
    for row in range(decoded.count):
        if row not in bad:
            height, width = source.shapes[row]
            box = cam_box(maps[row], int(height), int(width), plan.settings)
            image = Image.fromarray(source.pixels[row, :height, :width])
            crops[row] = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box))
            boxes[row] = to_image(box, int(height), int(width), source.regions[row])
    return crops, boxes


def test_threaded_crops_are_the_bytes_of_one_row_after_another(tmp_path):
    places = [(60, 40), (120, 90), (30, 120), (150, 20), (80, 80), (100, 60)]
    first = _batch(tmp_path, places, bad=(2,))  # 6 images, one unreadable, 2 padding rows
    second = _batch(tmp_path, places[:3], bad=(1,))  # fewer rows: the reused buffer's old rows are zeroed
    with Forward("mean-logits", threads=3) as forward:
        for decoded, plan, maps in (first, second):
            crops, boxes = forward.cam_crops(plan, decoded, maps)
            want_crops, want_boxes = _reference(decoded, plan, maps)
            assert crops.any()
            np.testing.assert_array_equal(crops, want_crops)
            np.testing.assert_array_equal(boxes, want_boxes)
            serial, serial_boxes = Forward("mean-logits", threads=1).cam_crops(plan, decoded, maps)
            np.testing.assert_array_equal(crops, serial)
            np.testing.assert_array_equal(boxes, serial_boxes)
        assert _crop_threads()
    assert not _crop_threads()


def test_rows_are_resized_at_once_and_close_stops_the_threads(tmp_path, monkeypatch):
    """Each resize waits for another one to start: rows resized one after another would never
    meet (the barrier breaks after its timeout)."""
    decoded, plan, maps = _batch(tmp_path, [(60, 40), (120, 90), (30, 120), (150, 20)])
    meet = threading.Barrier(2, timeout=20)
    names = set()
    resize = Image.Image.resize

    def waiting_resize(image, *args, **kwargs):
        names.add(threading.current_thread().name)
        meet.wait()
        return resize(image, *args, **kwargs)

    forward = Forward("mean-logits", threads=2)
    monkeypatch.setattr(Image.Image, "resize", waiting_resize)
    crops, _ = forward.cam_crops(plan, decoded, maps)
    monkeypatch.undo()
    assert len(names) == 2 and all(name.startswith("ens-crop") for name in names)
    assert len(_crop_threads()) == 2
    # A used Forward pickles (as anything Ray ships must): its copy starts its own threads.
    copy = pickle.loads(pickle.dumps(forward))
    np.testing.assert_array_equal(copy.cam_crops(plan, decoded, maps)[0], crops)
    copy.close()
    forward.close()
    assert not _crop_threads()
    # Usable after close: a new batch starts the threads again.
    np.testing.assert_array_equal(forward.cam_crops(plan, decoded, maps)[0], crops)
    assert _crop_threads()
    forward.close()
    assert not _crop_threads()


def test_a_run_resizes_on_threads_and_leaves_none_behind(tmp_path, monkeypatch):
    # Two cores, whatever this process may use (one under `make test`'s pinned workers): with
    # one, the crops are resized in the calling thread and there is no pool to see.
    monkeypatch.setattr("ensemble.inference.forward.cpu_threads", lambda: 2)
    folder = pasted(tmp_path / "images", [(100, 40), (150, 120), (210, 60), (120, 100), (90, 30)])
    model = cam_onnx(tmp_path / "texture.onnx", positive=True)
    seen = set()
    infer([model], [load_split(folder)], InferOptions(tta=("cam",), workers=0, batch_size=4, chunk_size=4,
                                                      out=tmp_path / "runs"),
          progress=lambda event: seen.update(_crop_threads()))
    assert seen  # the crops of the first batch were resized on the pool, still up at its chunk
    assert not _crop_threads()
