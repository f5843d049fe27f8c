"""Loaded at the start of every Python process of a test's `ens infer` (PYTHONPATH points here):
opening the image named by ``ENS_TEST_HANG`` sleeps forever, so the run stops right there, in
whichever decoding process meets it, until the test kills it."""

import os
import time

_HANG = os.environ.get("ENS_TEST_HANG")

if _HANG:
    from PIL import Image

    _open = Image.open

    def _hanging_open(fp, *args, **kwargs):
        if os.fspath(fp) == _HANG:
            while True:
                time.sleep(3600)
        return _open(fp, *args, **kwargs)

    Image.open = _hanging_open
