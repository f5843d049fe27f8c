"""`ens submit`'s modes (write, --check, --retry) decided in the submission stage
(:func:`ensemble.submission.submit.run_request`): every mode x option combination refused or
accepted as the command line did it before the table moved, what the library call then
receives, and the one rule on --competition, -m and --dry-run. Expectations are written out
by hand, not read from :data:`~ensemble.submission.submit.MODES`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.errors import EnsError
from ensemble.submission import submit as submit_module
from ensemble.submission.submit import OPTIONS, SubmitOptions, SubmitRequest, check_upload, run_request

#: One value for each option, as the command line hands it over.
VALUES = {
    "PREDICTIONS": {"predictions": Path("p.csv")},
    "--data": {"data": Path("d")},
    "--format": {"format": "inat2021"},
    "--name": {"name": "try2"},
    "--sample": {"sample": Path("s.csv")},
    "--missing": {"missing": "prior"},
    "--gzip": {"compress": True},
    "--dry-run": {"dry_run": True},
    "--competition": {"competition": "c"},
    "-m": {"message": "m"},
    "--memory": {"memory": "0.5"},
}
#: What each mode takes beside its own option (golden: as `ens submit` took them before).
TAKES = {
    "write": {"PREDICTIONS", "--data", "--format", "--name", "--sample", "--missing", "--gzip", "--dry-run",
              "--competition", "-m", "--memory"},
    "--check": {"--data", "--format", "--sample", "--memory"},
    "--retry": {"--competition", "-m"},
}
#: The least each mode runs with.
BASES = {
    "write": {"predictions": Path("p.csv"), "data": Path("d"), "competition": "c", "message": "m"},
    "--check": {"check": Path("f.csv"), "data": Path("d")},
    "--retry": {"retry": 3},
}


@pytest.fixture
def calls(monkeypatch):
    """The library calls a request reaches, recorded instead of run."""
    seen = []

    def recorder(name):
        def record(*args, **kwargs):
            seen.append((name, args, kwargs))
            return name
        return record

    for name in ("submit", "check", "retry"):
        monkeypatch.setattr(submit_module, name, recorder(name))
    return seen


def test_the_options_are_those_of_the_command_line():
    assert OPTIONS == tuple(VALUES)
    assert SubmitRequest().given() == ()
    every = SubmitRequest(**{k: v for value in VALUES.values() for k, v in value.items()})
    assert every.given() == OPTIONS


def _request(mode: str, option: str) -> SubmitRequest:
    fields = dict(BASES[mode], **VALUES[option])
    if mode == "write" and option == "--dry-run":  # a dry run uploads nothing
        del fields["competition"], fields["message"]
    return SubmitRequest(**fields)


def _expected_call(mode: str, option: str):
    """The library call of an accepted combination, with every argument."""
    if mode == "--check":
        return ("check", (Path("f.csv"), Path("d"), "inat2021" if option == "--format" else None,
                          Path("s.csv") if option == "--sample" else None),
                {"warn": None, "memory": 1 << 29 if option == "--memory" else None})
    if mode == "--retry":
        return ("retry", (3, "c" if option == "--competition" else None, "m" if option == "-m" else None), {})
    upload = {} if option == "--dry-run" else {"competition": "c", "message": "m"}
    changed = {"--format": {"format": "inat2021"}, "--name": {"name": "try2"}, "--sample": {"sample": Path("s.csv")},
               "--missing": {"missing": "prior"}, "--gzip": {"compress": True},
               "--memory": {"memory": 1 << 29}}.get(option, {})
    return ("submit", (Path("p.csv"), Path("d"), SubmitOptions(**upload, **changed)), {"warn": None})


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("mode", list(TAKES))
def test_every_mode_and_option(calls, mode, option):
    request = _request(mode, option)
    assert request.mode() == mode
    if option in TAKES[mode]:
        assert run_request(request) == _expected_call(mode, option)[0]
        assert calls == [_expected_call(mode, option)]
    else:
        with pytest.raises(EnsError) as info:
            run_request(request)
        assert str(info.value) == f"{mode} does not take {option}"
        assert calls == []


@pytest.mark.parametrize("mode, expected", [
    ("--check", "--check does not take PREDICTIONS, --name, --missing, --gzip, --dry-run, --competition, -m"),
    ("--retry", "--retry does not take PREDICTIONS, --data, --format, --name, --sample, --missing, --gzip, "
                "--dry-run, --memory"),
])
def test_a_refusal_names_every_option_refused_in_order(calls, mode, expected):
    request = SubmitRequest(**dict(BASES[mode], **{k: v for value in VALUES.values() for k, v in value.items()}))
    with pytest.raises(EnsError) as info:
        run_request(request)
    assert str(info.value) == expected and calls == []


@pytest.mark.parametrize("fields, expected", [
    ({}, "give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)"),
    ({"predictions": Path("p.csv"), "dry_run": True}, "give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)"),
    ({"data": Path("d"), "dry_run": True}, "give PREDICTIONS and --data DIR (or --check FILE, or --retry ID)"),
    ({"check": Path("f.csv")}, "--check FILE needs --data DIR (the test ids and categories to check against)"),
    ({"check": Path("f.csv"), "format": "inat2018", "sample": Path("s.csv")},
     "--check FILE needs --data DIR (the test ids and categories to check against)"),
    # Refusals come before what is lacking; --check with --retry before both.
    ({"check": Path("f.csv"), "name": "n"}, "--check does not take --name"),
    ({"check": Path("f.csv"), "retry": 1, "predictions": Path("p.csv")}, "--check and --retry do not go together"),
])
def test_what_a_mode_needs(calls, fields, expected):
    with pytest.raises(EnsError) as info:
        run_request(SubmitRequest(**fields))
    assert str(info.value) == expected and calls == []


def test_retry_needs_nothing_more(calls):
    assert run_request(SubmitRequest(retry=7)) == "retry"
    assert calls == [("retry", (7, None, None), {})]


DRY = "--dry-run uploads nothing: leave out --competition and -m"
GIVE = "give --competition C -m MSG to upload, or --dry-run to only write and record the file"
BOTH = "an upload needs both --competition C and -m MSG"


@pytest.mark.parametrize("dry_run, competition, message, expected", [
    (True, None, None, None),
    (True, "c", None, DRY),
    (True, None, "m", DRY),
    (True, "c", "m", DRY),
    (False, None, None, GIVE),
    (False, "c", None, GIVE),
    (False, None, "m", GIVE),
    (False, "c", "m", None),
    # A library call has no --dry-run: leaving out both is one.
    (None, None, None, None),
    (None, "c", None, BOTH),
    (None, None, "m", BOTH),
    (None, "c", "m", None),
])
def test_the_upload_rule(dry_run, competition, message, expected):
    if expected is None:
        check_upload(competition, message, dry_run)
    else:
        with pytest.raises(EnsError) as info:
            check_upload(competition, message, dry_run)
        assert str(info.value) == expected
    if dry_run is None:  # SubmitOptions holds the same rule
        if expected is None:
            assert SubmitOptions(competition=competition, message=message).competition == competition
        else:
            with pytest.raises(EnsError, match=f"^{expected}$"):
                SubmitOptions(competition=competition, message=message)


@pytest.mark.parametrize("fields, expected", [
    # Without --dry-run the upload rule speaks first, with it the --missing choice.
    ({"missing": "zero"}, GIVE),
    ({"missing": "zero", "dry_run": True}, "--missing zero: choose one of fail, prior"),
    ({"missing": "zero", "competition": "c", "message": "m"}, "--missing zero: choose one of fail, prior"),
    ({"competition": "c", "dry_run": True}, DRY),
    ({"message": "m"}, GIVE),
])
def test_writing_checks_in_order(calls, fields, expected):
    with pytest.raises(EnsError) as info:
        run_request(SubmitRequest(predictions=Path("p.csv"), data=Path("d"), **fields))
    assert str(info.value) == expected and calls == []


def test_left_out_options_keep_the_library_defaults(calls):
    run_request(SubmitRequest(predictions=Path("p.csv"), data=Path("d"), dry_run=True))
    run_request(SubmitRequest(check=Path("f.csv"), data=Path("d")))
    assert calls == [("submit", (Path("p.csv"), Path("d"), SubmitOptions()), {"warn": None}),
                     ("check", (Path("f.csv"), Path("d"), None, None), {"warn": None, "memory": None})]
