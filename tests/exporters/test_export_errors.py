"""Bad input: one clear error naming the file, key or option at fault, and no file written."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import pytest
import torch

from ensemble.errors import EnsError
from ensemble.metadata import read_metadata
from exporters import ExportOptions, export_checkpoint
from exporters import onnx_export

from tests.exporters.helpers import NUM_CLASSES, build

SIZE = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet18 state dict with NUM_CLASSES outputs, saved once."""
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.save(build("resnet18", SIZE).state_dict(), path)
    return path


def _fails(match, checkpoint, **options):
    out = checkpoint.parent / "out.onnx"
    before = set(checkpoint.parent.iterdir())
    with pytest.raises(EnsError, match=match) as info:
        export_checkpoint(checkpoint, out, ExportOptions(input_size=options.pop("input_size", SIZE), **options))
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists()
    assert set(checkpoint.parent.iterdir()) == before  # no temporary files left behind
    return message


def test_missing_file(tmp_path):
    with pytest.raises(EnsError, match="nope.pt: no such file"):
        export_checkpoint(tmp_path / "nope.pt", options=ExportOptions(arch="resnet18"))


@pytest.mark.parametrize("content, match", [
    (b"", "empty file, not a checkpoint"),
    (b"\x00\x01garbage bytes that are no pickle", "not a PyTorch checkpoint"),
    (b"epoch,loss\n1,0.5\n", "not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    message = _fails(match, path, arch="resnet18")
    assert str(path) in message


def test_pickle_of_something_else(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _fails("holds a list, not a state_dict", tmp_path / "list.pt", arch="resnet18")


def test_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "best_acc": 0.4}, tmp_path / "d.pt")
    _fails(r"keys \[epoch, best_acc\] but no weights under any of state_dict, model", tmp_path / "d.pt",
           arch="resnet18")


def test_not_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"{not really}")
    _fails("w.safetensors: not a safetensors file", tmp_path / "w.safetensors", arch="resnet18")


def test_state_dict_needs_arch(weights):
    _fails("holds only weights .* --arch", weights)


def test_unknown_architecture_suggests_names(weights):
    message = _fails("unknown architecture", weights, arch="resnet-18")
    assert "did you mean resnet18" in message


def test_unimportable_architecture(weights):
    _fails("cannot import 'no_such_package.nets' .No module named", weights, arch="no_such_package.nets:big")
    _fails("'torchvision.models' has no attribute 'nothing_here'", weights, arch="torchvision.models:nothing_here")


def test_weights_that_do_not_fit(weights):
    message = _fails("weights do not fit resnet34: missing keys: layer1.2.conv1.weight", weights, arch="resnet34")
    assert str(weights) in message


def test_weights_of_another_family(weights):
    message = _fails("weights do not fit mnasnet1_0", weights, arch="mnasnet1_0")
    assert "missing keys" in message and "unexpected keys: conv1.weight" in message


def test_num_classes_contradicts_weights(weights):
    _fails(f"--num-classes 1010 contradicts .*fc.weight has {NUM_CLASSES} rows", weights, arch="resnet18",
           num_classes=1010)


def test_num_classes_contradicts_whole_model(tmp_path):
    torch.save(build("resnet18", SIZE), tmp_path / "whole.pt")
    _fails(f"--num-classes 10 contradicts .* predicts {NUM_CLASSES} classes", tmp_path / "whole.pt", num_classes=10)


def test_arch_kwargs_do_not_apply_to_a_whole_model(tmp_path):
    torch.save(build("resnet18", SIZE), tmp_path / "whole.pt")
    _fails("holds a whole model, so --arch-kwargs", tmp_path / "whole.pt", arch_kwargs={"dropout": 0.3})


def test_bad_arch_kwargs(weights):
    _fails("cannot build it with --arch-kwargs", weights, arch="resnet18", arch_kwargs={"no_such_option": 1})


def test_unpicklable_model(tmp_path, monkeypatch):
    (tmp_path / "gone_module.py").write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    torch.save(gone_module.Net(), tmp_path / "net.pt")
    (tmp_path / "gone_module.py").unlink()
    sys.modules.pop("gone_module")
    _fails("cannot unpickle it, a class it needs is not importable", tmp_path / "net.pt")


@pytest.mark.parametrize("option, value, match", [
    ("mean", (123.7, 116.3, 103.5), "--mean .* fractions of 255"),
    ("std", (0.2, 0.0, 0.2), "--std .* must be positive"),
    ("input_size", 8, "--input-size 8"),
    ("resize", "stretch", "--resize stretch: choose one of center-crop, squash"),
    ("crop_pct", 1.5, "--crop-pct 1.5"),
    ("interpolation", "lanczos", "--interpolation lanczos: choose one of bilinear, bicubic"),
])
def test_bad_options(weights, option, value, match):
    _fails(match, weights, arch="resnet18", **{option: value})


def test_output_must_be_onnx(weights):
    with pytest.raises(EnsError, match="must end in .onnx"):
        export_checkpoint(weights, weights.parent / "model.bin", ExportOptions(arch="resnet18"))


def test_classes_file_errors(weights, tmp_path):
    (tmp_path / "short.json").write_text(json.dumps([1, 2, 3]))
    _fails(f"short.json: lists 3 categories but the model predicts {NUM_CLASSES}", weights, arch="resnet18",
           classes=tmp_path / "short.json")
    (tmp_path / "dup.json").write_text(json.dumps([5, 6, 7, 8, 9, 10, 5]))
    _fails("category id 5 appears twice", weights, arch="resnet18", classes=tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text("{oops")
    _fails("bad.json: not valid JSON", weights, arch="resnet18", classes=tmp_path / "bad.json")
    _fails("--classes .*missing.json: no such file", weights, arch="resnet18", classes=tmp_path / "missing.json")


def test_classes_mapping_is_stored(weights, tmp_path):
    coco = {"images": [], "categories": [{"id": i, "name": f"sp{i}"} for i in (40, 10, 30, 20, 70, 60, 50)]}
    (tmp_path / "val2019.json").write_text(json.dumps(coco))
    result = export_checkpoint(weights, tmp_path / "m.onnx", ExportOptions(
        arch="resnet18", input_size=SIZE, classes=tmp_path / "val2019.json"))
    assert result.metadata.class_ids == (10, 20, 30, 40, 50, 60, 70)
    assert result.metadata.category_id(2) == 30
    (tmp_path / "folders.json").write_text(json.dumps(["0", "1", "10", "100", "2", "3", "a"]))
    result = export_checkpoint(weights, tmp_path / "m.onnx", ExportOptions(
        arch="resnet18", input_size=SIZE, classes=tmp_path / "folders.json"))
    assert result.metadata.class_ids == (0, 1, 10, 100, 2, 3, "a")


def test_classes_from_an_image_folder_in_imagefolder_order(weights, tmp_path):
    train = tmp_path / "train"
    for name in ("1", "2", "3", "10", "11", "12", "20"):  # "10" < "2" as strings
        (train / name).mkdir(parents=True)
        (train / name / "image.jpg").write_bytes(b"")
    result = export_checkpoint(weights, tmp_path / "m.onnx", ExportOptions(
        arch="resnet18", input_size=SIZE, classes=train))
    assert read_metadata(result.path).class_ids == (1, 10, 11, 12, 2, 20, 3)
    (tmp_path / "flat").mkdir()
    _fails("--classes .*flat: a folder without class subfolders", weights, arch="resnet18", classes=tmp_path / "flat")


def test_failed_verification_leaves_no_file_and_keeps_an_old_one(weights, monkeypatch):
    out = weights.parent / "older.onnx"
    out.write_bytes(b"an older export")
    monkeypatch.setattr(onnx_export, "FP32_MAX_ABS_DIFF", -1.0)  # no graph can pass
    with pytest.raises(EnsError, match="verification failed: onnxruntime differs from torch at 64 px"):
        export_checkpoint(weights, out, ExportOptions(arch="resnet18", input_size=SIZE))
    assert out.read_bytes() == b"an older export"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["older.onnx", "r18.pt"]
    out.unlink()


def test_failed_fp16_verification(weights, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP16_MIN_TOP1_AGREEMENT", 1.01)
    _fails("fp16 verification failed at 64 px: top-1 agreement 100% < 101%", weights, arch="resnet18", fp16=True)


def test_model_that_does_not_take_the_size(tmp_path):
    torch.save(build("resnet18", SIZE), tmp_path / "whole.pt")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 30 * 30, 4))
    torch.save(model, tmp_path / "flat.pt")
    _fails("flat.pt: the model does not run on 64 px inputs .* set --input-size", tmp_path / "flat.pt")


def test_model_that_returns_no_tensor(tmp_path, monkeypatch):
    (tmp_path / "dict_out.py").write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)
            def forward(self, x):
                return {"logits": self.fc(x.mean((2, 3)))}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import dict_out

    torch.save(dict_out.Net(), tmp_path / "net.pt")
    _fails("the model returns a dict, expected a .batch, classes. tensor", tmp_path / "net.pt")
