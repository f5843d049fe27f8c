"""`ens submit` and `ens submissions`: check, write, record, upload, retry, refresh.

:func:`run_request` is `ens submit`: its modes (:data:`MODES`: write, ``--check``, ``--retry``),
what each takes and needs, and the one rule on ``--competition``, ``-m`` and ``--dry-run``
(:func:`check_upload`) live here; the command line only parses and prints.

The order inside :func:`submit` is what keeps files, ledger and Kaggle consistent: the Kaggle
client and its credentials are tried first (nothing is written when they are missing), then
the rows are checked, and traced back to the test json they were made from
(:mod:`ensemble.submission.origin`; with ``--missing prior``, the test ids they lack are then
filled, :mod:`ensemble.submission.fill`), all before anything is written; then, holding the ledger's
write lock (:meth:`~ensemble.formats.ledger.Ledger.record`), the file created under a
name no other file has and its ledger row inserted as ``not-uploaded`` (both or neither),
and only then the upload tried, its outcome (``uploaded`` or ``upload-failed``) stored in
the same row. :func:`retry` uploads a recorded file again after checking that its bytes are
still those recorded. Warnings (a ``--format`` the layout disagrees with, a default file name
made safe or shortened, predictions not traced to the test json) go to a ``warn`` callback
before the upload, so a failed upload does not hide them.

Files and ledger go to ``submissions/`` of the folder ens runs in (:data:`SUBMISSIONS`), the work
folder that holds ``blends/`` and ``runs/``, where `ens report` looks for the ledger; a
``submissions/`` inside a blend folder (`ens submit .` run there) is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ensemble.errors import EnsError
from ensemble.fileio import sha256_file, write_new
from ensemble.formats.blend import BLEND_FILE, BLENDS, BlendSummary
from ensemble.formats.common import check_regular, read_json
from ensemble.formats.ledger import Entry, Ledger, as_text
from ensemble.formats.predictions import PREDICTIONS_FILE
from ensemble.memory import memory_budget
from ensemble.submission import kaggle_client
from ensemble.submission.fill import DEFAULT_MISSING, MISSING_HINT, Fill, check_missing, fill_missing, find_fill
from ensemble.submission.kaggle_client import Receipt, UploadError
from ensemble.submission.kaggle_csv import (Reference, Submission, check_file, check_rows, choose_format,
                                            load_reference, read_predictions, submission_bytes, submission_name,
                                            submission_path)
from ensemble.submission.origin import check_test_set

#: Where files and ledger go, relative to the folder ens runs in (the work folder, which holds
#: blends/ and runs/; `ens report` looks for the ledger there).
SUBMISSIONS = Path("submissions")
#: Something to show a warning with, as soon as it is known (before any upload).
Warn = Callable[[str], None]


@dataclass(frozen=True)
class SubmitOptions:
    """How `ens submit` writes and uploads. ``format``: the competition format, ``None`` for the
    one ``--data``'s layout names (:func:`ensemble.submission.kaggle_csv.choose_format`);
    ``name``: the file name after the timestamp, ``None`` for the blend folder's name;
    ``sample``: a sample submission whose ids the file must also
    hold exactly; ``compress``: write ``.csv.gz``; ``missing``: what test ids the predictions
    lack get, ``fail`` or ``prior`` (:data:`ensemble.submission.fill.MISSING`). ``competition``
    and ``message`` together mean upload; both ``None`` mean a dry run (:func:`check_upload`).
    ``memory``: bytes for the blocks of rows the CSVs are read and checked in (``--memory``;
    ``None``: the default budget, :func:`ensemble.memory.memory_budget`)."""

    format: str | None = None
    name: str | None = None
    sample: Path | None = None
    compress: bool = False
    competition: str | None = None
    message: str | None = None
    missing: str = DEFAULT_MISSING
    memory: int | None = None

    def __post_init__(self):
        check_missing(self.missing)
        check_upload(self.competition, self.message)


def check_upload(competition: str | None, message: str | None, dry_run: bool | None = None) -> None:
    """The rule on ``--competition``, ``-m`` and ``--dry-run``: an upload needs both ``competition``
    and ``message``, a dry run neither. ``dry_run``: whether ``--dry-run`` was given (`ens submit`
    wants a dry run said, so that a forgotten ``-m`` is no silent dry run); ``None`` where no
    such flag exists (:class:`SubmitOptions`), leaving out both then means a dry run."""
    upload = competition is not None or message is not None
    complete = competition is not None and message is not None
    if dry_run is None:
        if upload and not complete:
            raise EnsError("an upload needs both --competition C and -m MSG")
    elif dry_run:
        if upload:
            raise EnsError("--dry-run uploads nothing: leave out --competition and -m")
    elif not complete:
        raise EnsError("give --competition C -m MSG to upload, or --dry-run to only write and record the file")


@dataclass(frozen=True)
class SubmitResult:
    """The written (or retried) file, its ledger row, Kaggle's receipt (``None`` for a dry run),
    the row its ``entry.filled`` filled rows hold (``None`` when none was filled) and the
    warnings to show (a ``--format`` the layout disagrees with, predictions not traced to the
    test json)."""

    path: Path
    entry: Entry
    receipt: Receipt | None
    fill: Fill | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckResult:
    """What ``ens submit --check`` found: the checked rows, what they were checked against and
    the warnings to show."""

    submission: Submission
    reference: Reference
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RefreshResult:
    """All ledger rows after a refresh; ``found`` of the ``asked`` tried uploads were listed by Kaggle."""

    entries: tuple[Entry, ...]
    asked: int
    found: int


@dataclass(frozen=True)
class PredictionsSource:
    """Where ``PREDICTIONS`` points: the CSV, the provenance in the ``blend.json`` beside it
    (``None`` without one), the source the ledger records (the blend folder, or the CSV when it
    is not a blend's ``predictions.csv``) and the default file name."""

    csv: Path
    blend: BlendSummary | None
    source: str
    name: str


def resolve_predictions(path: str | os.PathLike) -> PredictionsSource:
    """``PREDICTIONS``: a blend folder holding ``predictions.csv``, or a CSV file."""
    path = Path(path)
    csv = path / PREDICTIONS_FILE if path.is_dir() else path
    if not csv.exists():
        raise EnsError(f"{path}: no {PREDICTIONS_FILE} in this folder" if path.is_dir() else f"{path}: no such file")
    check_regular(csv)  # a FIFO would leave the reader waiting forever
    blend_json = csv.parent / BLEND_FILE
    blend = BlendSummary.read(blend_json) if blend_json.is_file() else None
    # The ledger stores text: a path's bytes that are not UTF-8 as \xNN (sqlite refuses lone surrogates).
    if csv.name == PREDICTIONS_FILE:
        return PredictionsSource(csv=csv, blend=blend, source=as_text(str(csv.parent)),
                                 name=csv.parent.resolve().name)
    return PredictionsSource(csv=csv, blend=blend, source=as_text(str(csv)), name=csv.name.split(".")[0])


def submit(predictions: str | os.PathLike, data: str | os.PathLike, options: SubmitOptions,
           folder: str | os.PathLike = SUBMISSIONS, warn: Warn | None = None) -> SubmitResult:
    """Check the predictions against ``--data``, write the CSV, record it, upload it.

    Each warning is given to ``warn`` before the upload (so that it is seen even when the
    upload fails) and kept in the result's ``notes``: a ``--format`` the layout disagrees with
    before the Kaggle client connects, and those about the file written (its name,
    ``unverified``) once it is written and recorded, as they then are true; a check or write
    that fails before gives only its error."""
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if warn is not None:
            warn(text)

    _check_folder(folder)
    fmt, format_notes = choose_format(data, options.format)
    for text in format_notes:
        note(text)
    kaggle = kaggle_client.connect() if options.competition is not None else None
    source = resolve_predictions(predictions)
    reference = load_reference(data, fmt, options.sample, options.memory)
    now = _now()
    name, name_note = submission_name(folder, options.name, source.name, now, options.compress)
    checked = check_rows(read_predictions(source.csv, fmt, reference, _models_predict(source), options.memory), fmt,
                         reference, source.csv, allow_missing=options.missing == "prior", hint=MISSING_HINT)
    test_set = check_test_set(source.csv, checked.ids, reference.test_source, reference.test_sha256)
    missing = np.setdiff1d(reference.test_ids, checked.ids)
    fill = None
    if missing.size:
        fill = find_fill(data, fmt, reference, checked, source.csv)
        checked = fill_missing(checked, missing, fill)

    first_choice = submission_path(folder, name, now, options.compress)
    content = submission_bytes(checked, options.compress)  # made before the ledger is locked, to lock it briefly
    ledger = Ledger(folder)
    entry = ledger.record(lambda: write_new(first_choice, content), created=f"{now:%Y-%m-%dT%H:%M:%SZ}",
                          format=fmt.name, rows=len(checked.ids), source=source.source, blend=source.blend,
                          filled=int(missing.size), fill_source=None if fill is None else fill.source,
                          test_sha256=test_set.sha256, test_check=test_set.check)
    path = Path(folder) / entry.file
    for text in (name_note, test_set.warning):
        if text is not None:
            note(text)
    if kaggle is None:
        return SubmitResult(path=path, entry=entry, receipt=None, fill=fill, notes=tuple(notes))
    result = _upload(kaggle, ledger, entry, path, options.competition, options.message)
    return dataclasses.replace(result, fill=fill, notes=tuple(notes))


def _check_folder(folder: str | os.PathLike) -> None:
    """The submissions folder is not to be made inside a blend folder (`ens submit .` run in
    one) nor in the folder of blend folders (``blends/``, `ens submit nll` run in it): `ens
    report` looks for the ledger beside blends/, and would never find it there."""
    parent = Path(os.path.abspath(folder)).parent
    if (parent / BLEND_FILE).exists():
        raise EnsError(f"{parent} holds {BLEND_FILE}: ens submit writes {Path(folder).name}/ and its ledger in the "
                       "folder it runs in, and a blend folder is not the place (`ens report` looks for the ledger "
                       "in the folder that holds blends/); run ens submit from there")
    if parent.name == BLENDS:  # `ens blend`'s folder of blend folders; a blend written elsewhere
        # (--out nll) beside the work folder's submissions/ is fine: `ens report` looks in ./submissions
        raise EnsError(f"{parent} is the folder of blend folders (blends/): ens submit writes {Path(folder).name}/ "
                       "and its ledger in the folder it runs in, and `ens report` looks for the ledger in the "
                       "folder that holds blends/; run ens submit from there")


def _models_predict(source: PredictionsSource) -> int | None:
    """How many categories the blended models predict: the length of ``class_ids`` in the
    blend.json beside the predictions; ``None`` when there is none to read."""
    if source.blend is None:
        return None
    doc = read_json(source.csv.parent / BLEND_FILE)
    class_ids = doc.get("class_ids") if isinstance(doc, dict) else None
    return len(class_ids) if isinstance(class_ids, list) and class_ids else None


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


def refresh_scores(folder: str | os.PathLike = SUBMISSIONS) -> RefreshResult:
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


def check(file: str | os.PathLike, data: str | os.PathLike, format: str | None = None,
          sample: str | os.PathLike | None = None, warn: Warn | None = None, memory: int | None = None) -> CheckResult:
    """``ens submit --check``: every check on any CSV; nothing is written. ``format``: ``None``
    for the one ``--data``'s layout names. The ids and categories are checked, not which images
    the rows are predictions of: a competition CSV carries nothing that leads back to its
    stores (only a blend's ``predictions.csv`` does, through the blend.json beside it, and
    that is what `ens submit` checks, :mod:`ensemble.submission.origin`). ``memory``: as in
    :class:`SubmitOptions`."""
    fmt, notes = choose_format(data, format)
    if warn is not None:
        for text in notes:
            warn(text)
    reference = load_reference(data, fmt, sample, memory)
    return CheckResult(submission=check_file(file, fmt, reference, memory), reference=reference, notes=notes)


# ------------------------------------------------------------------------------ `ens submit`'s modes

#: `ens submit`'s options as its messages name them, in the order a refusal lists them.
OPTIONS = ("PREDICTIONS", "--data", "--format", "--name", "--sample", "--missing", "--gzip", "--dry-run",
           "--competition", "-m", "--memory")


@dataclass(frozen=True)
class SubmitRequest:
    """What `ens submit` was given, as it was given: ``None`` (``False`` for the flags) for an
    option left out, so that a mode can refuse what it does not take and a default stays that
    of :class:`SubmitOptions` or :func:`check`. ``check``: ``--check FILE``, ``retry``:
    ``--retry ID``; neither: write the predictions (and upload them). ``memory``: the text of
    ``--memory`` (:func:`ensemble.memory.memory_budget` reads it, or the default, when a mode
    runs)."""

    predictions: Path | None = None
    data: Path | None = None
    format: str | None = None
    name: str | None = None
    sample: Path | None = None
    missing: str | None = None
    compress: bool = False
    dry_run: bool = False
    competition: str | None = None
    message: str | None = None
    check: Path | None = None
    retry: int | None = None
    memory: str | None = None

    def given(self) -> tuple[str, ...]:
        """The :data:`OPTIONS` given, in their order."""
        present = (self.predictions is not None, self.data is not None, self.format is not None,
                   self.name is not None, self.sample is not None, self.missing is not None, self.compress,
                   self.dry_run, self.competition is not None, self.message is not None, self.memory is not None)
        return tuple(option for option, given in zip(OPTIONS, present, strict=True) if given)

    def mode(self) -> str:
        """The :data:`MODES` key of this request."""
        if self.check is not None and self.retry is not None:
            raise EnsError("--check and --retry do not go together")
        return "--check" if self.check is not None else "--retry" if self.retry is not None else WRITE


@dataclass(frozen=True)
class Mode:
    """One way `ens submit` runs. ``takes``: the :data:`OPTIONS` it accepts beside its own (any
    other one given is refused, all of them named in one line); ``needs``: those it cannot run
    without, and ``lacking``, what to say when one is left out; ``run``: the library call."""

    takes: tuple[str, ...]
    needs: tuple[str, ...]
    lacking: str
    run: Callable[[SubmitRequest, Warn | None], SubmitResult | CheckResult]


def _run_write(request: SubmitRequest, warn: Warn | None) -> SubmitResult:
    check_upload(request.competition, request.message, dry_run=request.dry_run)
    # An option left out (None) keeps SubmitOptions' own default.
    options = SubmitOptions(format=request.format, name=request.name, sample=request.sample,
                            compress=request.compress, competition=request.competition, message=request.message,
                            missing=request.missing or DEFAULT_MISSING, memory=_memory(request))
    return submit(request.predictions, request.data, options, warn=warn)


def _run_check(request: SubmitRequest, warn: Warn | None) -> CheckResult:
    return check(request.check, request.data, request.format, request.sample, warn=warn, memory=_memory(request))


def _memory(request: SubmitRequest) -> int | None:
    """Bytes of ``--memory`` as given (a bad value is one line); None, the default budget, without it."""
    return None if request.memory is None else memory_budget(request.memory)


def _run_retry(request: SubmitRequest, warn: Warn | None) -> SubmitResult:
    return retry(request.retry, request.competition, request.message)


#: The mode of a request without ``--check`` or ``--retry``.
WRITE = "write"
#: `ens submit`'s modes by the option that picks them (:meth:`SubmitRequest.mode`).
MODES: dict[str, Mode] = {
    WRITE: Mode(takes=OPTIONS, needs=("PREDICTIONS", "--data"),
                lacking="give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)", run=_run_write),
    "--check": Mode(takes=("--data", "--format", "--sample", "--memory"), needs=("--data",),
                    lacking="--check FILE needs --data DIR (the test ids and categories to check against)",
                    run=_run_check),
    "--retry": Mode(takes=("--competition", "-m"), needs=(), lacking="", run=_run_retry),
}


def run_request(request: SubmitRequest, warn: Warn | None = None) -> SubmitResult | CheckResult:
    """`ens submit`: refuse what the request's mode does not take or lacks, then run the mode
    (:func:`submit`, :func:`check` or :func:`retry`); ``warn`` is given each warning as soon as
    it is known (before any upload)."""
    name = request.mode()
    mode = MODES[name]
    given = request.given()
    refused = [option for option in given if option not in mode.takes]
    if refused:
        raise EnsError(f"{name} does not take {', '.join(refused)}")
    if not set(mode.needs) <= set(given):
        raise EnsError(mode.lacking)
    return mode.run(request, warn)
