"""ens: from trained image classifiers to one checked competition submission.

The pipeline flows one way::

    checkpoint -> exporters (torch -> ONNX) -> ensemble (inference, blending, submission)
                                               weights_search (blend weights, pure maths)

This package holds the command line (:mod:`ensemble.cli`) and the parts of the pipeline that
run without torch; :mod:`ensemble.metadata` is the contract between an exported ONNX file and
everything that reads it.
"""

__version__ = "0.1.0"
