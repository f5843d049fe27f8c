"""The `ens` command line: parses options, calls one library function, prints the result.

User errors (:class:`~ensemble.errors.EnsError`) become one line on stderr and exit status 2
here and nowhere else; ``ens --debug ...`` shows the traceback instead. Heavy libraries (torch,
onnx) are imported inside the commands that need them, so ``ens --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from ensemble import __version__
from ensemble.errors import EnsError

app = typer.Typer(
    name="ens",
    help="From trained image classifiers to one checked competition submission.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclasses.dataclass
class _State:
    debug: bool = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = _State(debug=debug)


@contextlib.contextmanager
def _user_errors(ctx: typer.Context) -> Iterator[None]:
    try:
        yield
    except EnsError as exc:
        if ctx.obj is not None and ctx.obj.debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _floats3(text: str, option: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EnsError(f"{option} {text}: expected three numbers R,G,B") from None
    if len(values) != 3:
        raise EnsError(f"{option} {text}: expected three numbers R,G,B, got {len(values)}")
    return values  # type: ignore[return-value]


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EnsError(f"{option}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise EnsError(f"{option}: expected a JSON object such as '{{\"transform_input\": true}}'")
    return value


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A state_dict / training checkpoint (.pt, .pth, .safetensors), a pickled model, or a TorchScript archive.", show_default=False)],
    arch: Annotated[Optional[str], typer.Option(help="Network to build for a state_dict: a torchvision model name (resnet50, inception_v3, ...) or package.module:callable.")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Keyword arguments for the builder, e.g. '{\"transform_input\": true}'.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Number of classes; read from the classifier weights when omitted.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input height and width in pixels [default: 299 for inception_v3, else 224].")] = None,
    mean: Annotated[str, typer.Option(metavar="R,G,B", help="Normalisation mean, as fractions of 255.")] = "0.485,0.456,0.406",
    std: Annotated[str, typer.Option(metavar="R,G,B", help="Normalisation std, as fractions of 255.")] = "0.229,0.224,0.225",
    resize: Annotated[str, typer.Option(help="How inference fits images to the input: center-crop (shorter side to size/crop-pct, then centre crop) or squash.")] = "center-crop",
    crop_pct: Annotated[float, typer.Option(help="Fraction of the resized image kept by center-crop.")] = 0.875,
    classes: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Output index -> category id: a JSON list, or a COCO json whose categories sorted by id give the order.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Write a float16 model (uint8 input and float32 output kept).")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="OUT.onnx", help="Output file [default: the checkpoint's path with .onnx, or .fp16.onnx].")] = None,
) -> None:
    """Export a checkpoint to a verified, self-describing ONNX file.

    The graph takes uint8 RGB images (batch, height, width, 3) and returns float32 logits
    (batch, classes). Every export is checked with onnx.checker and compared with torch by
    onnxruntime at two input sizes before the file is written.
    """
    with _user_errors(ctx):
        from exporters import ExportOptions, export_checkpoint

        options = ExportOptions(
            arch=arch,
            arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs") if arch_kwargs else {},
            num_classes=num_classes,
            input_size=input_size,
            mean=_floats3(mean, "--mean"),
            std=_floats3(std, "--std"),
            resize=resize,
            crop_pct=crop_pct,
            classes=classes,
            fp16=fp16,
        )
        result = export_checkpoint(checkpoint, output, options)
    meta = result.metadata
    shape = "any size" if meta.dynamic_size else f"fixed {meta.input_size} px"
    typer.echo(f"exported {meta.architecture}: {meta.num_classes} classes, {meta.input_size} px "
               f"({shape}), {meta.precision}, in {result.seconds:.1f} s")
    for note in result.notes:
        typer.echo(f"  note: {note}")
    for check in meta.verification:
        agree = round(check.top1_agreement * check.batch)
        typer.echo(f"  verified {check.precision} at {check.size} px: max |logit diff| "
                   f"{check.max_abs_diff:.2e}, top-1 agrees on {agree}/{check.batch}")
    size_mb = result.path.stat().st_size / 1e6
    typer.echo(f"wrote {result.path} ({size_mb:.1f} MB)")


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="An ONNX file written by `ens export`.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
) -> None:
    """Show the metadata `ens export` stored in an ONNX file."""
    with _user_errors(ctx):
        from ensemble.metadata import read_metadata

        meta = read_metadata(model)
    values = dataclasses.asdict(meta)
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    ids = values.pop("class_ids")
    values["class_ids"] = "output index" if ids is None else (
        f"{len(ids)} ids: {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}")
    checks = values.pop("verification")
    width = max(map(len, values))
    for key, value in values.items():
        typer.echo(f"{key:<{width}}  {value}")
    for check in checks:
        typer.echo(f"{'verified':<{width}}  {check['precision']} at {check['size']} px: max |logit diff| "
                   f"{check['max_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.0%} "
                   f"of {check['batch']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
