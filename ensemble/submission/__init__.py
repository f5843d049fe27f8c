"""Stage 4, `ens submit`: fused predictions -> a checked competition CSV, recorded and uploaded.

``formats`` (competition CSV formats, the checks every file passes, writing), ``prior`` (rows
for the test ids the predictions lack, ``--missing prior``), ``ledger`` (the sqlite record of
every file written and what Kaggle said of it), ``kaggle_client`` (the official Kaggle client,
imported only when an upload needs it) and ``submit`` (the command's flow: check, write,
record, upload, retry, refresh).
"""
