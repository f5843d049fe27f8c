"""Stage 2, `ens infer`: ONNX models x dataset splits x TTA views -> logit stores.

``decode`` (images to uint8 arrays, each decoded once, in worker processes), ``tta`` (the views
and how their logits merge: pure maths), ``cam`` (the cam view's box: pure maths), ``runtime``
(onnxruntime sessions and devices), ``forward`` (one decoded batch through every model's views,
and the local engine that schedules batches), ``ray_engine`` (the same batches on a Ray
cluster), ``store`` (the resumable on-disk logit store every later stage reads) and ``run``
(the split loop that ties them together: :func:`ensemble.inference.run.infer`).
"""
