"""Stage 3, `ens blend`: logit stores in, blend weights and fused top-k predictions out.

The maths lives in :mod:`weights_search` (pure arrays); this module reads the stores, checks
that they line up, finds the validation labels, runs the cross-validated report and the final
fit, streams the applied split through the fitted blend, and writes the two output files of a
blend folder (``blends/<name>/``)::

    blend.json        method, members, weights, temperatures, the CV table, the sha256 of every
                      input store, the label source, each model's provenance (model file
                      sha256, preprocessing, TTA views and merge) and the long-tail prior
                      correction (the prior file's sha256, the class counts, tau); `ens blend
                      --weights` re-applies it, to stores made the same way only
    predictions.csv   id,category_1..category_K,prob_1..prob_K: one row per image of the
                      applied split, real dataset category ids, most probable first

A *member* is a model (``resnet50``) or, with ``--views``, one TTA view of a model
(``resnet50/flip``).

``--prior FILE`` gives the training class counts (:func:`ensemble.formats.dataset.read_class_counts`: a COCO/iNat json's
annotations, a JSON object ``{"category_id": count}`` or a CSV ``category_id,count``), mapped to
the output columns through the stores' class ids; the blend's prediction is then corrected for
that prior after fusion (:mod:`weights_search.prior`), ``tau`` fitted with the weights.
"""
