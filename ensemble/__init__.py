"""ens: from trained image classifiers to one checked competition submission.

The pipeline flows one way::

    checkpoint -> exporters (torch -> ONNX) -> ensemble (inference, blending, submission)
                                               weights_search (blend weights, pure maths)

The stages, in the order data flows through them::

    exporters/               ens export   checkpoint -> verified ONNX (the only part needing torch)
    ensemble/inference/      ens infer    ONNX x split x TTA views -> logit stores
    ensemble/blend/          ens blend    stores -> fitted weights (maths in weights_search/)
                                          -> predictions.csv
    ensemble/submission/     ens submit   predictions.csv -> checked CSV, ledger, Kaggle upload

Shared by the stages: :mod:`ensemble.cli` (the command line, and nothing else),
:mod:`ensemble.formats` (one module per file the stages hand each other: the model's ONNX
metadata, a dataset split, a logit store, the blend record, predictions.csv, the ledger; stages
import formats, never each other), :mod:`ensemble.errors` and :mod:`ensemble.fileio`. Everything here runs without torch.
"""

__version__ = "0.1.0"
