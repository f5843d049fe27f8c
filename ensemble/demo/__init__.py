"""`ens demo`: the whole pipeline on a small competition built from real images (see run.py)."""
