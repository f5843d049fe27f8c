"""Blend-weight optimisation: pure maths on arrays (numpy and scipy in, arrays out).

It imports nothing else of ens, so it can be reused and tested on its own.

Flow: member logits ``(M, N, C)`` -> :func:`log_softmax` (optionally with
:func:`fit_temperatures`) -> a method from :func:`get_method` fitted on validation (optionally
with a :class:`LogitAdjustment`, the long-tail prior correction) -> :func:`fuse` its weights over
new rows, chunk by chunk, then :func:`adjust` for the prior. :func:`fit_blend` and
:func:`blend_chunks` do that in two calls; :func:`cross_validate` gives the honest estimates,
:func:`cross_validate_and_fit` both the estimates and the fit from the same passes.
A member is whatever is stacked on the first axis: a model, or a (model, view) pair.

Those functions read members from a *member source* (:class:`MemberSource`: an
:class:`ArraySource` over arrays, or ``ens``'s store reader), a block of rows at a time, in
the few passes their docstrings count, so large splits need no ``(M, N, C)`` stack in memory.
"""

from weights_search.accuracy import AccuracyBlend
from weights_search.base import Blender
from weights_search.fitted import FittedBlend, blend_chunks, fit_blend
from weights_search.cv import (
    PRIOR_SUFFIX, CvReport, CvRow, cross_val_log_probs, cross_validate, cross_validate_and_fit, stratified_folds,
)
from weights_search.functional import FUSIONS, GEOMETRIC, MIXTURE, fuse, log_softmax, top_k
from weights_search.greedy import GreedyBlend, GreedyStep
from weights_search.metrics import bootstrap_ci, correct_at_k, mean_nll, top1, topk_accuracy, true_class_rank
from weights_search.mixture import NllBlend, UniformBlend
from weights_search.pooling import LogitBlend
from weights_search.prior import TAU_BOUNDS, ZERO_COUNT, LogitAdjustment, adjust, class_log_prior, fit_tau
from weights_search.registry import DEFAULT_METHOD, METHODS, get_method
from weights_search.source import ArraySource, MemberSource, as_source, blocks
from weights_search.temperature import TEMPERATURE_BOUNDS, fit_temperature, fit_temperatures

__all__ = [
    "DEFAULT_METHOD", "FUSIONS", "GEOMETRIC", "METHODS", "MIXTURE", "PRIOR_SUFFIX", "TAU_BOUNDS",
    "TEMPERATURE_BOUNDS", "ZERO_COUNT",
    "AccuracyBlend", "ArraySource", "Blender", "CvReport", "CvRow", "FittedBlend", "GreedyBlend", "GreedyStep",
    "LogitAdjustment", "LogitBlend", "MemberSource", "NllBlend", "UniformBlend",
    "adjust", "as_source", "blend_chunks", "blocks", "bootstrap_ci", "class_log_prior", "correct_at_k",
    "cross_val_log_probs", "cross_validate", "cross_validate_and_fit", "fit_blend", "fit_tau", "fit_temperature",
    "fit_temperatures", "fuse", "get_method", "log_softmax", "mean_nll", "stratified_folds", "top1", "top_k",
    "topk_accuracy", "true_class_rank",
]
