"""`ens submit` and `ens submissions`: check, write, record, upload, retry, refresh.

The order inside :func:`submit` is what keeps files, ledger and Kaggle consistent: the Kaggle
client and its credentials are tried first (nothing is written when they are missing), then
the rows are checked (with ``--missing prior``, the test ids they lack filled from a prior,
:mod:`ensemble.submission.prior`, before anything is written), then, holding the ledger's
write lock (:meth:`~ensemble.formats.ledger.Ledger.record`), the file created under a
name no other file has and its ledger row inserted as ``not-uploaded`` (both or neither),
and only then the upload tried, its outcome (``uploaded`` or ``upload-failed``) stored in
the same row. :func:`retry` uploads a recorded file again after checking that its bytes are
still those recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.submission import kaggle_client
from ensemble.errors import EnsError
from ensemble.fileio import sha256_file
from ensemble.submission.kaggle_client import Receipt, UploadError
from ensemble.formats.ledger import BlendProvenance, Entry, Ledger, read_blend
from ensemble.submission.formats import (Reference, Submission, check_file, check_rows, get_format,
                                         load_reference, read_predictions, submission_bytes, submission_path,
                                         write_new)
from ensemble.submission.prior import DEFAULT_MISSING, HINT, Prior, check_missing, fill, find_prior

#: Where files and ledger go, relative to the working folder.
SUBMISSIONS = Path("submissions")
PREDICTIONS = "predictions.csv"
DEFAULT_FORMAT = "inat2019"
BLEND = "blend.json"


@dataclass(frozen=True)
class SubmitOptions:
    """How `ens submit` writes and uploads. ``name``: the file name after the timestamp, ``None``
    for the blend folder's name; ``sample``: a sample submission whose ids the file must also
    hold exactly; ``compress``: write ``.csv.gz``; ``missing``: what test ids the predictions
    lack get, ``fail`` or ``prior`` (:data:`ensemble.submission.prior.MISSING`). ``competition``
    and ``message`` together mean upload; both ``None`` mean a dry run."""

    format: str = DEFAULT_FORMAT
    name: str | None = None
    sample: Path | None = None
    compress: bool = False
    competition: str | None = None
    message: str | None = None
    missing: str = DEFAULT_MISSING

    def __post_init__(self):
        check_missing(self.missing)
        if (self.competition is None) != (self.message is None):
            raise EnsError("an upload needs both --competition C and -m MSG")


@dataclass(frozen=True)
class SubmitResult:
    """The written (or retried) file, its ledger row, Kaggle's receipt (``None`` for a dry run)
    and the prior its ``entry.filled`` filled rows hold (``None`` when none was filled)."""

    path: Path
    entry: Entry
    receipt: Receipt | None
    prior: Prior | None = None


@dataclass(frozen=True)
class CheckResult:
    """What ``ens submit --check`` found: the checked rows and what they were checked against."""

    submission: Submission
    reference: Reference


@dataclass(frozen=True)
class RefreshResult:
    """All ledger rows after a refresh; ``found`` of the ``asked`` tried uploads were listed by Kaggle."""

    entries: tuple[Entry, ...]
    asked: int
    found: int


@dataclass(frozen=True)
class Predictions:
    """Where ``PREDICTIONS`` points: the CSV, the provenance in the ``blend.json`` beside it
    (``None`` without one), the source the ledger records (the blend folder, or the CSV when it
    is not a blend's ``predictions.csv``) and the default file name."""

    csv: Path
    blend: BlendProvenance | None
    source: str
    name: str


def resolve_predictions(path: str | os.PathLike) -> Predictions:
    """``PREDICTIONS``: a blend folder holding ``predictions.csv``, or a CSV file."""
    path = Path(path)
    csv = path / PREDICTIONS if path.is_dir() else path
    if not csv.is_file():
        raise EnsError(f"{path}: no {PREDICTIONS} in this folder" if path.is_dir() else f"{path}: no such file")
    blend_json = csv.parent / BLEND
    blend = read_blend(blend_json) if blend_json.is_file() else None
    if csv.name == PREDICTIONS:
        return Predictions(csv=csv, blend=blend, source=str(csv.parent), name=csv.parent.resolve().name)
    return Predictions(csv=csv, blend=blend, source=str(csv), name=csv.name.split(".")[0])


def submit(predictions: str | os.PathLike, data: str | os.PathLike, options: SubmitOptions,
           folder: str | os.PathLike = SUBMISSIONS) -> SubmitResult:
    """Check the predictions against ``--data``, write the CSV, record it, upload it."""
    fmt = get_format(options.format)
    kaggle = kaggle_client.connect() if options.competition is not None else None
    source = resolve_predictions(predictions)
    reference = load_reference(data, fmt, options.sample)
    checked = check_rows(read_predictions(source.csv, fmt), fmt, reference, source.csv,
                         allow_missing=options.missing == "prior", hint=HINT)
    missing = np.setdiff1d(reference.test_ids, checked.ids)
    prior = None
    if missing.size:
        prior = find_prior(data, fmt, reference, checked, source.csv)
        checked = fill(checked, missing, prior)

    now = _now()
    first_choice = submission_path(folder, options.name or source.name, now, options.compress)
    content = submission_bytes(checked, options.compress)  # made before the ledger is locked, to lock it briefly
    ledger = Ledger(folder)
    entry = ledger.record(lambda: write_new(first_choice, content), created=f"{now:%Y-%m-%dT%H:%M:%SZ}",
                          format=fmt.name, rows=len(checked.ids), source=source.source, blend=source.blend,
                          filled=int(missing.size), fill_source=None if prior is None else prior.source)
    path = Path(folder) / entry.file
    if kaggle is None:
        return SubmitResult(path=path, entry=entry, receipt=None, prior=prior)
    result = _upload(kaggle, ledger, entry, path, options.competition, options.message)
    return dataclasses.replace(result, prior=prior)


def _now() -> dt.datetime:
    """The UTC time a file is named and recorded with (tests fix it)."""
    return dt.datetime.now(dt.timezone.utc)


def retry(entry_id: int, competition: str | None = None, message: str | None = None,
          folder: str | os.PathLike = SUBMISSIONS) -> SubmitResult:
    """Upload a recorded file again; ``competition`` / ``message`` replace the recorded ones
    (a dry run recorded none, so it needs both)."""
    ledger = Ledger(folder)
    entry = ledger.get(entry_id)
    if entry.status == "uploaded":
        raise EnsError(f"ledger entry {entry_id}: {entry.file} was already uploaded to {entry.competition} "
                       f"(Kaggle submission {entry.kaggle_ref}); write a new file to upload again")
    competition = competition or entry.competition
    message = message or entry.message
    if competition is None or message is None:
        raise EnsError(f"ledger entry {entry_id}: {entry.file} was never uploaded; give --competition C -m MSG")
    path = Path(folder) / entry.file
    if not path.is_file():
        raise EnsError(f"ledger entry {entry_id}: {path} no longer exists")
    if sha256_file(path) != entry.sha256:
        raise EnsError(f"ledger entry {entry_id}: {path} changed since it was recorded (sha256 differs); "
                       "write a new file with `ens submit`")
    return _upload(kaggle_client.connect(), ledger, entry, path, competition, message)


def _upload(kaggle: kaggle_client.Kaggle, ledger: Ledger, entry: Entry, path: Path, competition: str,
            message: str) -> SubmitResult:
    try:
        receipt = kaggle.submit(str(path), competition, message)
    except UploadError as exc:
        ledger.upload_tried(entry.id, competition, message, error=str(exc))
        raise UploadError(f"upload of {path} to {competition} failed: {exc}; the file stays as ledger entry "
                          f"{entry.id} (upload-failed), `ens submit --retry {entry.id}` tries again") from None
    entry = ledger.upload_tried(entry.id, competition, message, kaggle_ref=receipt.ref)
    return SubmitResult(path=path, entry=entry, receipt=receipt)


def refresh(folder: str | os.PathLike = SUBMISSIONS) -> RefreshResult:
    """Fetch Kaggle's status and scores for every row an upload was tried for.

    A row is matched by its Kaggle submission id, or by file name when the ledger has none
    (an upload that went through although the reply was lost).
    """
    ledger = Ledger(folder)
    tried = [e for e in ledger.entries() if e.competition is not None]
    found = 0
    if tried:
        kaggle = kaggle_client.connect()
        for competition in sorted({e.competition for e in tried}):
            remote = kaggle.submissions(competition)
            by_ref = {s.ref: s for s in remote}
            by_name: dict[str, kaggle_client.RemoteSubmission] = {}
            for s in reversed(remote):  # listed newest first: the newest of a name wins
                by_name[s.file_name] = s
            for entry in (e for e in tried if e.competition == competition):
                match = by_ref.get(entry.kaggle_ref) if entry.kaggle_ref else by_name.get(entry.file)
                if match is None:
                    continue
                found += 1
                ledger.store_scores(entry.id, kaggle_ref=match.ref, kaggle_status=match.status,
                                    public_score=match.public_score, private_score=match.private_score,
                                    error=match.error, uploaded=match.date)
    return RefreshResult(entries=tuple(ledger.entries()), asked=len(tried), found=found)


def check(file: str | os.PathLike, data: str | os.PathLike, format: str = DEFAULT_FORMAT,
          sample: str | os.PathLike | None = None) -> CheckResult:
    """``ens submit --check``: every check on any CSV; nothing is written."""
    fmt = get_format(format)
    reference = load_reference(data, fmt, sample)
    return CheckResult(submission=check_file(file, fmt, reference), reference=reference)
