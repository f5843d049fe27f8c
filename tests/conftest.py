"""Shared by every test: onnxruntime's telemetry off (see ensemble.inference.runtime.onnxruntime).

Tests open onnxruntime sessions of their own; without this, its background uploader may send
usage events through whatever HTTPS proxy a test has set (the Kaggle stand-in's, for one).
"""

from ensemble.inference.runtime import onnxruntime

onnxruntime()
