"""Stage 4, `ens submit`: fused predictions -> a checked competition CSV, recorded and uploaded.

``kaggle_csv`` (the competition CSV formats, the checks every file passes, writing), ``fill``
(rows for the test ids the predictions lack, ``--missing prior``), ``origin`` (the test json
the predictions were made from, traced through blend.json to the stores), ``kaggle_client`` (the
official Kaggle client, imported only when an upload needs it) and ``submit`` (the command:
its modes and their refusals, then check, write, record, upload, retry, refresh). The ledger,
the sqlite record of every file written and what Kaggle said of it, is a format:
:mod:`ensemble.formats.ledger`.
"""
