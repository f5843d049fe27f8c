"""Helpers for the exporter tests: small random networks that behave like trained ones."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

from exporters.architectures import find_head
from exporters.onnx_export import check_images, second_size

NUM_CLASSES = 7


def calibrate(model: nn.Module, size: int) -> nn.Module:
    """Make a randomly initialised network behave like a trained one, numerically.

    Random initialisation leaves BN at mean 0 / var 1, so activations vanish or explode and
    the logits of different classes tie. Here BN gets the running statistics of photo-like
    inputs (as training would give it), its gains are damped, and the head is scaled so the
    logits spread over a few units.
    """
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    aux = getattr(model, "AuxLogits", None)
    if aux is not None:  # it needs >= 299 px inputs in training mode; its weights stay
        model.AuxLogits = None
    # Photo-like inputs (smooth, as the exporter's check batch), normalised as the graph does.
    batches = [(check_images(16, s, seed=99).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
               for s in (size, second_size(size))]
    model.train()
    with torch.no_grad():
        for images in batches:
            model(images)
        model.eval()
        # A random network is chaotic (a 1e-3 input change moves logits by ~0.5), unlike a
        # trained one; damping every BN gain makes it contract, so float16 rounding and
        # onnxruntime's summation order perturb it as little as they perturb trained models.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.mul_(0.6)
        # Trained classifiers have logits of a few units: scale the head to that range.
        _, head = find_head(model)
        spread = model(images).std()
        head.weight.mul_(4.0 / spread)
        if head.bias is not None:
            head.bias.mul_(4.0 / spread)
    if aux is not None:
        model.AuxLogits = aux
    return model


def build(arch: str, size: int, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if arch in ("inception_v3", "googlenet"):
        kwargs.setdefault("init_weights", False)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    return calibrate(model, size)


def reference_logits(model: nn.Module, images: np.ndarray, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """The model applied to uint8 NHWC images normalised outside any graph, in float64 maths."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x.float()).numpy()


def onnx_logits(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def torch_cam(model: nn.Module, images: np.ndarray, feature_of, after, head_of):
    """``(logits, cam)`` of the model on uint8 NHWC images, the CAM from a hooked feature map."""
    seen = []
    hook = feature_of(model).register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    try:
        with torch.no_grad():
            logits = model(x.float())
    finally:
        hook.remove()
    feature = seen[-1] if after is None else after(seen[-1])
    weight = head_of(model).weight.detach().double()
    top1 = logits.argmax(1)
    cam = np.stack([np.tensordot(weight[c].numpy(), feature[i].double().numpy(), axes=(0, 0))
                    for i, c in enumerate(top1.tolist())])
    return logits.numpy(), cam


def run_outputs(path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the ONNX file at ``path`` on ``images``, by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": images})))


def random_images(batch: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)

