"""Stage 2, `ens infer`: ONNX models x dataset splits x TTA views -> logit stores.

``decode`` (images to uint8 arrays, each decoded once, in worker processes), ``tta`` (the views
and how their logits merge: pure maths), ``runtime`` (onnxruntime sessions and devices),
``store`` (the resumable on-disk logit store every later stage reads) and ``run`` (the loop
that ties them together: :func:`ensemble.inference.run.infer`).
"""
