"""torch -> ONNX: checkpoints in the forms people save them become verified, self-describing
ONNX files (see :mod:`exporters.onnx_export`). The only package of ens that needs torch."""

from exporters.onnx_export import ExportOptions, ExportResult, export_checkpoint

__all__ = ["ExportOptions", "ExportResult", "export_checkpoint"]
