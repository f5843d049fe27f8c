"""The files the stages hand each other, one module each, and the one place each is read and
checked:

    model.py        the ens metadata of an exported ONNX file (`ens export` -> every reader)
    dataset.py      a dataset split (COCO/iNat json or image folder), its labels, class counts
    image.py        an image file of a split (read by `ens infer` and `ens report`, the same checks)
    store.py        a logit store and its manifest (`ens infer` -> `ens blend`, `ens report`)
    blend.py        blend.json, the blend record (`ens blend` -> `ens report`, `ens submit`)
    predictions.py  predictions.csv (`ens blend` -> `ens submit`)
    ledger.py       submissions/ledger.sqlite (`ens submit` -> `ens submissions`, `ens report`)

Stages import formats, never each other.
"""
