"""Why a blend is what it is: calibration, diversity and long-tail accuracy of members and blends.

Pure functions on arrays, for `ens report`. Shapes: ``M`` members (or models), ``N`` rows,
``C`` classes. A row's *confidence* is its largest class probability and its *prediction* the
column holding it (ties: the lower column, as ``np.argmax`` and :mod:`weights_search.metrics`
rank them).

Reliability and expected calibration error follow Guo, Pleiss, Sun and Weinberger, "On
calibration of modern neural networks", ICML 2017: ``B`` equal-width confidence bins over
``[0, 1]``, bin ``b`` holding the confidences in ``(b / B, (b + 1) / B]`` (bin 0 also holds 0);
``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weights_search.metrics import check_scores

#: Confidence bins of a reliability diagram (Guo et al. use 15).
N_BINS = 15
#: Class-frequency buckets of the long-tail view: head, middle, tail.
BUCKETS = ("head", "middle", "tail")


def confidence_and_correct(log_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` float64 confidence (the largest probability) and ``(N,)`` bool whether that
    class is the label, for ``(N, C)`` log-probabilities (no NaN) and ``(N,)`` column labels
    (integers in ``0..C-1``), checked by :func:`weights_search.metrics.check_scores`."""
    log_probs, labels = check_scores(log_probs, labels)
    predicted = np.argmax(log_probs, axis=1)
    # At most 1: float32 log-probabilities of a fused blend can round a few 1e-7 above 0.
    confidence = np.minimum(np.exp(log_probs[np.arange(labels.size), predicted].astype(np.float64)), 1.0)
    return confidence, predicted == labels


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram: per bin, ``(B,)`` arrays of the mean confidence, the accuracy and
    the row count (mean confidence and accuracy are NaN in an empty bin); ``ece`` over all rows."""

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float

    @property
    def edges(self) -> np.ndarray:
        """``(B + 1,)`` bin edges from 0 to 1."""
        return np.linspace(0.0, 1.0, self.count.size + 1)


def bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """``(N,)`` int64 bin of each confidence in ``[0, 1]``: ``b`` for ``(b / B, (b + 1) / B]``, 0 for 0."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if confidence.size and (np.isnan(confidence).any() or confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> Reliability:
    """The reliability diagram and expected calibration error of ``(N,)`` confidences and
    ``(N,)`` 0/1 hits (e.g. from :func:`confidence_and_correct`), ``N >= 1``."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.ndim != 1 or confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError(f"expected two non-empty (n_samples,) arrays, got {confidence.shape} and {correct.shape}")
    bins = bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, hit_sum / count, np.nan)
    ece = float(np.abs(hit_sum - conf_sum).sum() / confidence.size)
    return Reliability(mean_conf, accuracy, count, ece)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """``sum_b (n_b / N) |accuracy_b - confidence_b|`` over ``n_bins`` equal-width bins."""
    return reliability(confidence, correct, n_bins).ece


def error_correlation(correct: np.ndarray) -> np.ndarray:
    """``(M, M)`` Pearson correlation between the members' error indicators.

    ``correct``: ``(M, N)`` 0/1 hits. Two members that fail on the same rows correlate near 1;
    a member whose errors fall where the others are right correlates near 0 or below, which is
    why it can earn weight though it is weaker. A member that is always right (or always wrong)
    has no variance: its entries are NaN, its diagonal 1.
    """
    errors = 1.0 - np.asarray(correct, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[1] == 0:
        raise ValueError(f"expected (n_members, n_samples) hits, got shape {errors.shape}")
    centred = errors - errors.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred @ centred.T) / np.outer(norm, norm)
    np.fill_diagonal(corr, 1.0)
    return corr


def disagreement(predictions: np.ndarray) -> np.ndarray:
    """``(M, M)`` fraction of rows on which two members predict different classes, for ``(M, N)``
    predicted columns."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[1] == 0:
        raise ValueError(f"expected (n_members, n_samples) predictions, got shape {predictions.shape}")
    return (predictions[:, None, :] != predictions[None, :, :]).mean(axis=2)


def frequency_buckets(counts: np.ndarray, n_buckets: int = len(BUCKETS)) -> np.ndarray:
    """``(C,)`` int64 bucket of each class by its training count: 0 for the most frequent
    classes (head) up to ``n_buckets - 1`` (tail).

    Classes are ranked by count, most first (equal counts: lower column first), and the ranking
    is cut into ``n_buckets`` runs of equal size (the first ones one longer when ``C`` does not
    divide), so each bucket holds about as many classes.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < n_buckets or n_buckets < 1:
        raise ValueError(f"expected (n_classes,) counts with at least {n_buckets} classes, got shape {counts.shape}")
    order = np.argsort(-counts, kind="stable")
    buckets = np.empty(counts.size, dtype=np.int64)
    buckets[order] = np.concatenate([np.full(len(part), b) for b, part in
                                     enumerate(np.array_split(np.arange(counts.size), n_buckets))])
    return buckets


def accuracy_by_bucket(correct: np.ndarray, labels: np.ndarray, class_bucket: np.ndarray,
                       n_buckets: int = len(BUCKETS)) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of each member in each class-frequency bucket.

    ``correct``: ``(M, N)`` 0/1 hits; ``labels``: ``(N,)`` columns; ``class_bucket``: ``(C,)``
    from :func:`frequency_buckets`. Returns ``(M, n_buckets)`` accuracies (NaN where a bucket
    has no row) and ``(n_buckets,)`` row counts.
    """
    correct = np.asarray(correct, dtype=np.float64)
    labels = np.asarray(labels)
    if correct.ndim != 2 or labels.shape != correct.shape[1:]:
        raise ValueError(f"expected (n_members, n_samples) hits and (n_samples,) labels, "
                         f"got {correct.shape} and {labels.shape}")
    row_bucket = np.asarray(class_bucket)[labels]
    rows = np.bincount(row_bucket, minlength=n_buckets)
    hits = np.stack([np.bincount(row_bucket, weights=c, minlength=n_buckets) for c in correct])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, hits / rows, np.nan), rows
