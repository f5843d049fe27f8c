"""Bad input: one clear error naming the file, key or option at fault, and no file written."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import pytest
import torch

from ensemble.errors import EnsError
from ensemble.formats.model import read_metadata
from exporters import ExportOptions, export_checkpoint
from exporters import onnx_export

from tests.conftest import copy_checkpoint
from tests.exporters.helpers import NUM_CLASSES

SIZE = 64


@pytest.fixture(scope="module")
def weights(resnet18_64, tmp_path_factory):
    """A resnet18 state dict with NUM_CLASSES outputs (the session's, at SIZE px), in this module's folder."""
    return copy_checkpoint(resnet18_64[1], tmp_path_factory.mktemp("w"), "r18.pt")


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


def test_num_classes_contradicts_whole_model(tmp_path, resnet18_64):
    torch.save(resnet18_64[0], tmp_path / "whole.pt")
    _fails(f"--num-classes 10 contradicts .* predicts {NUM_CLASSES} classes", tmp_path / "whole.pt", num_classes=10,
           trust_pickle=True)


def test_arch_kwargs_do_not_apply_to_a_whole_model(tmp_path, resnet18_64):
    torch.save(resnet18_64[0], tmp_path / "whole.pt")
    _fails("holds a whole model, so --arch-kwargs", tmp_path / "whole.pt", arch_kwargs={"dropout": 0.3},
           trust_pickle=True)


def test_bad_arch_kwargs(weights):
    _fails("cannot build it with --arch-kwargs", weights, arch="resnet18", arch_kwargs={"no_such_option": 1})


@pytest.mark.parametrize("kwargs, raised", [
    ({"replace_stride_with_dilation": [True]}, "ValueError: replace_stride_with_dilation should be None or a "
                                               "3-element tuple"),
    ({"groups": 2}, "ValueError: BasicBlock only supports groups=1 and base_width=64"),
    ({"replace_stride_with_dilation": [False, False, True]}, "NotImplementedError: Dilation > 1 not supported"),
])
def test_arch_kwargs_the_builder_rejects_with_any_exception(weights, kwargs, raised):
    # torchvision checks its arguments with ValueError, NotImplementedError, assert, ...: not only TypeError.
    message = _fails("cannot build it with --arch-kwargs", weights, arch="resnet18", arch_kwargs=kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    assert message.startswith(f"--arch resnet18: cannot build it with --arch-kwargs {{{shown}}} ({raised}")


@pytest.fixture
def no_giant_build(monkeypatch):
    """Fail the test if a network with an implausible head is built (gigabytes, minutes)."""
    from exporters import architectures

    build = architectures.Architecture.build

    def guarded(self, num_classes, kwargs):
        assert num_classes is None or num_classes <= 100_000, f"built {self.name} with {num_classes} classes"
        return build(self, num_classes, kwargs)

    monkeypatch.setattr(architectures.Architecture, "build", guarded)


def test_a_classifier_that_contradicts_the_architecture_is_refused_unbuilt(tmp_path, resnet18_64, no_giant_build):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in resnet18_64[0].state_dict().items()}
    state["fc.weight"] = torch.zeros(5_000_000, 1, dtype=torch.float16)  # resnet18's head takes 512 features
    state["fc.bias"] = torch.zeros(5_000_000, dtype=torch.float16)
    save_file(state, str(tmp_path / "odd.safetensors"))
    message = _fails("fc.weight", tmp_path / "odd.safetensors", arch="resnet18")
    assert message == (f"{tmp_path / 'odd.safetensors'}: fc.weight has shape (5000000, 1), but resnet18's "
                       "classifier takes 512 inputs: expected (classes, 512)")


def test_an_implausible_number_of_classes_is_refused_unbuilt(tmp_path, resnet18_64, no_giant_build):
    state = resnet18_64[0].state_dict()
    # 2 million rows of 512 (4 GB as a network) stored in a few bytes: an expanded view keeps one value.
    state["fc.weight"] = torch.zeros(1).expand(2_000_000, 512)
    state["fc.bias"] = torch.zeros(1).expand(2_000_000)
    torch.save(state, tmp_path / "huge.pt")
    message = _fails("fc.weight", tmp_path / "huge.pt", arch="resnet18")
    assert message == (f"{tmp_path / 'huge.pt'}: fc.weight has shape (2000000, 512): 2,000,000 classes is "
                       "implausible (ens exports at most 1,000,000); is it the right file?")


def test_num_classes_beyond_the_bound(weights):
    _fails("--num-classes 2000000: at most 1,000,000", weights, arch="resnet18", num_classes=2_000_000)


class _RunsAShellCommand:
    """What a malicious checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_code_in_a_checkpoint_does_not_run_without_trust_pickle(weights, tmp_path):
    import shlex

    marker = tmp_path / "it-ran"
    evil = {"state_dict": torch.load(weights, weights_only=True),
            "callback": _RunsAShellCommand(f"touch {shlex.quote(str(marker))}")}
    torch.save(evil, tmp_path / "evil.pt")
    message = _fails("holds pickled code objects", tmp_path / "evil.pt", arch="resnet18")
    assert not marker.exists()
    assert message == (f"{tmp_path / 'evil.pt'}: holds pickled code objects (posix.system); loading it runs code "
                       "from the file: pass --trust-pickle only for checkpoints you trust")


@pytest.mark.slow
def test_a_whole_model_needs_trust_pickle(tmp_path, resnet18_64):
    torch.save(resnet18_64[0], tmp_path / "whole.pt")
    message = _fails("holds pickled code objects", tmp_path / "whole.pt")
    assert message.startswith(f"{tmp_path / 'whole.pt'}: holds pickled code objects (a whole model: ")
    assert "torchvision.models.resnet.ResNet" in message
    assert message.endswith("loading it runs code from the file: pass --trust-pickle only for checkpoints you trust")
    result = export_checkpoint(tmp_path / "whole.pt", options=ExportOptions(input_size=SIZE, trust_pickle=True))
    assert result.metadata.num_classes == NUM_CLASSES
    assert "loaded with --trust-pickle: unpickling ran code from the file" in result.notes


def test_a_whole_model_in_the_legacy_format_needs_trust_pickle(tmp_path, resnet18_64):
    # torch.save's format before torch 1.6 (not a zip): the unpickler's refusal names the class.
    torch.save(resnet18_64[0], tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    message = _fails("holds pickled code objects", tmp_path / "old.pt")
    assert message == (f"{tmp_path / 'old.pt'}: holds pickled code objects (torchvision.models.resnet.ResNet); "
                       "loading it runs code from the file: pass --trust-pickle only for checkpoints you trust")


def test_an_argparse_namespace_in_a_training_checkpoint_needs_no_trust(weights, tmp_path):
    import argparse

    # timm's and torchvision's reference training scripts save their arguments this way.
    torch.save({"state_dict": torch.load(weights, weights_only=True), "args": argparse.Namespace(lr=0.1, arch="r18")},
               tmp_path / "timm_style.pth")
    result = export_checkpoint(tmp_path / "timm_style.pth", tmp_path / "t.onnx",
                               ExportOptions(arch="resnet18", input_size=SIZE))
    assert not any("ran code" in note for note in result.notes)


def test_an_existing_folder_at_the_output_path(weights, tmp_path, monkeypatch):
    (tmp_path / "m.onnx").mkdir()
    monkeypatch.setattr(onnx_export, "load_checkpoint", _must_not_load)
    with pytest.raises(EnsError) as info:
        export_checkpoint(weights, tmp_path / "m.onnx", ExportOptions(arch="resnet18"))
    assert str(info.value) == f"-o {tmp_path / 'm.onnx'}: a folder stands there; name the .onnx file to write"


@pytest.mark.parametrize("below", ["m.onnx", "sub/m.onnx"])
def test_a_file_where_the_output_folder_should_be(weights, tmp_path, monkeypatch, below):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    monkeypatch.setattr(onnx_export, "load_checkpoint", _must_not_load)
    out = tmp_path / "notes.txt" / below
    with pytest.raises(EnsError) as info:
        export_checkpoint(weights, out, ExportOptions(arch="resnet18"))
    assert str(info.value) == (f"-o {out}: {tmp_path / 'notes.txt'} is a file, not a folder; move it, or write "
                               "somewhere else")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_the_default_output_beside_the_checkpoint_is_checked_too(weights, tmp_path, monkeypatch):
    (tmp_path / "r18.onnx").mkdir()
    (tmp_path / "r18.pt").write_bytes(weights.read_bytes())
    monkeypatch.setattr(onnx_export, "load_checkpoint", _must_not_load)
    with pytest.raises(EnsError) as info:
        export_checkpoint(tmp_path / "r18.pt", options=ExportOptions(arch="resnet18"))
    assert str(info.value) == (f"{tmp_path / 'r18.onnx'}: a folder stands there; name the .onnx file to write "
                               "with -o")


def _must_not_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the output location was checked")


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
    _fails("cannot unpickle it, a class it needs is not importable", tmp_path / "net.pt", trust_pickle=True)


@pytest.mark.parametrize("option, value, match", [
    ("mean", (123.7, 116.3, 103.5), "--mean .* fractions of 255"),
    ("std", (0.2, 0.0, 0.2), "--std .* must be positive"),
    ("input_size", 8, "--input-size 8"),
    ("resize", "stretch", "--resize stretch: choose one of center-crop, squash"),
    ("crop_pct", 1.5, "--crop-pct 1.5"),
    ("interpolation", "area", "--interpolation area: choose one of bilinear, bicubic, nearest, lanczos"),
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


def test_model_that_does_not_take_the_size(tmp_path, resnet18_64):
    torch.save(resnet18_64[0], tmp_path / "whole.pt")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 30 * 30, 4))
    torch.save(model, tmp_path / "flat.pt")
    _fails("flat.pt: the model does not run on 64 px inputs .* set --input-size", tmp_path / "flat.pt",
           trust_pickle=True)


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
    _fails("the model returns a dict, expected a .batch, classes. tensor", tmp_path / "net.pt", trust_pickle=True)


def test_a_fifo_checkpoint_or_classes_file_is_refused_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(EnsError, match=r"model.pt: a named pipe \(FIFO\), not a regular file"):
        export_checkpoint(tmp_path / "model.pt", tmp_path / "out.onnx", ExportOptions(arch="resnet18"))
    from exporters.classes import load_class_ids

    os.mkfifo(tmp_path / "classes.json")
    with pytest.raises(EnsError, match=r"--classes .*classes.json: a named pipe \(FIFO\), not a regular file"):
        load_class_ids(tmp_path / "classes.json", 5)
