"""Stage 2, `ens infer`: ONNX models x dataset splits x TTA views -> logit stores.

``options`` (:class:`~ensemble.inference.options.InferOptions`, the run's defaults), ``decode``
(images to uint8 arrays, each decoded once, in worker processes), ``tta`` (the views and how
their logits merge: pure maths), ``cam`` (the cam view's box: pure maths), ``foreign`` (ONNX
files without ens metadata brought to the ens contract), ``runtime`` (onnxruntime sessions,
devices, the TensorRT cache), ``forward`` (one decoded batch through every model's views, and
the plan every engine opens), ``engine`` (the contract an engine implements: what it is given,
what it returns), ``local`` (the engine of this machine), ``ray_engine`` (the same batches on a
Ray cluster) and ``run`` (the split loop that ties them together and writes the stores,
:mod:`ensemble.formats.store`: :func:`ensemble.inference.run.infer`).
"""
