"""The `ens` command line: parses options, calls one library function, prints the result.

User errors (:class:`~ensemble.errors.EnsError`) become one line on stderr and exit status 2
here and nowhere else; ``ens --debug ...`` shows the traceback instead. Heavy libraries (torch,
onnx) are imported inside the commands that need them, so ``ens --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from ensemble import __version__
from ensemble import memory as _memory
from ensemble.errors import EnsError, printable
from ensemble.formats.common import parse_json
from ensemble.formats.model import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ModelMetadata, rgb_text
from ensemble.inference.foreign import DEFAULT_CROP_PCT, DEFAULT_RESIZE, ForeignPreprocess
from ensemble.inference.options import InferOptions

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


def _echo(text: str = "", err: bool = False) -> None:
    """Print one line, with control characters shown as escapes (:func:`ensemble.errors.printable`):
    messages, notes and tables hold file names and fields from files. Every line ens prints
    goes through here."""
    typer.echo(printable(text), err=err)


def _version(value: bool) -> None:
    if value:
        _echo(f"ens {__version__}")
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
        _echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # the file system said no (a full disk, a read-only folder, a file in the way)
        if ctx.obj is not None and ctx.obj.debug:
            raise
        _echo(f"error: {os_error(exc)}", err=True)
        raise typer.Exit(2) from None


#: What to do about the file-system errors a run may meet, by errno.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space and run the same command again (finished work is kept)",
    errno.EDQUOT: "the disk quota is used up: free space and run the same command again",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "no permission: write somewhere else, or fix the folder's permissions",
    errno.EPERM: "not permitted: write somewhere else, or fix the folder's permissions",
    errno.ENOTDIR: "a file stands where a folder is needed: move it, or write somewhere else",
    errno.EEXIST: "a file stands where a folder is needed: move it, or write somewhere else",
    errno.EISDIR: "a folder stands where a file is needed",
    errno.EFBIG: "a file-size limit was reached (see `ulimit -f`; FAT32 stops files at 4 GiB): raise it, "
                 "or write to another file system, and run the same command again (finished work is kept)",
}


def os_error(exc: OSError) -> str:
    """One line for an operating-system error: the file, what went wrong, what to do."""
    where = exc.filename if exc.filename is not None else "ens"
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno)
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


def _floats3(text: str, option: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EnsError(f"{option} {text}: expected three numbers R,G,B") from None
    if len(values) != 3:
        raise EnsError(f"{option} {text}: expected three numbers R,G,B, got {len(values)}")
    return values  # type: ignore[return-value]


def _json_object(text: str, option: str) -> dict:
    value = parse_json(text, option, problem="not valid JSON")
    if not isinstance(value, dict):
        raise EnsError(f"{option}: expected a JSON object such as '{{\"transform_input\": true}}'")
    return value


#: ``--memory GIB`` for every command that streams stores: the text goes to
#: :func:`ensemble.memory.memory_budget`, which reads ENS_MEMORY when it is left out and turns a
#: bad value into one line (typer's own float check would print a usage block).
MemoryOption = Annotated[Optional[str], typer.Option("--memory", metavar="GIB", help=_memory.HELP,
                                                     show_default=_memory.DEFAULT_SHOWN)]


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A state_dict / training checkpoint (.pt, .pth, .safetensors; a timm train.py checkpoint needs no --arch), a Hugging Face-style folder (config.json + model.safetensors, as timm's save_for_hf writes it), a pickled model (with --trust-pickle), or a TorchScript archive.", show_default=False)],
    arch: Annotated[Optional[str], typer.Option(help="Network to build for a state_dict: a torchvision model name (resnet50, inception_v3, ...), timm/NAME or timm/NAME.TAG (a timm model; the tag picks its pretrained config, e.g. timm/convnext_tiny.fb_in22k_ft_in1k), or package.module:callable.")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Keyword arguments for the builder, e.g. '{\"transform_input\": true}'.")] = None,
    weights_key: Annotated[Optional[str], typer.Option("--weights-key", metavar="NAME", help="The entry of a checkpoint dict that holds the weights, e.g. state_dict_ema for timm's EMA weights \\[default: the first of state_dict, model, model_state_dict, net, ema].")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Number of classes; read from the classifier weights when omitted.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input height and width in pixels; a timm model's comes from its checkpoint's args or config \\[default: 299 for inception_v3, else 224].")] = None,
    mean: Annotated[Optional[str], typer.Option(metavar="R,G,B", help=f"Normalisation mean, as fractions of 255 \\[default: {rgb_text(IMAGENET_MEAN)} (ImageNet)].")] = None,
    std: Annotated[Optional[str], typer.Option(metavar="R,G,B", help=f"Normalisation std, as fractions of 255 \\[default: {rgb_text(IMAGENET_STD)} (ImageNet)].")] = None,
    resize: Annotated[Optional[str], typer.Option(help=f"How inference fits images to the input: center-crop (shorter side to size/crop-pct, then centre crop) or squash \\[default: {ModelMetadata.resize}].")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help=f"Fraction of the resized image kept by center-crop \\[default: {ModelMetadata.crop_pct:g}].")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help=f"Resampling filter inference resizes images with: {', '.join(INTERPOLATIONS)} (timm's pretrained models use bicubic) \\[default: {ModelMetadata.interpolation}].")] = None,
    classes: Annotated[Optional[Path], typer.Option(metavar="FILE|DIR", help="Output index -> category id: the training images' folder (ImageFolder's order: class folder names sorted as strings, 10 before 2), a JSON list, or a COCO json whose categories sorted by id give the order. Ids that spell integers (\"7\", \"007\") are integers, as ens blend reads val labels.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Write a float16 model (uint8 input and float32 output kept).")] = False,
    no_cam: Annotated[bool, typer.Option("--no-cam", help="Leave out the cam output (the top-1 class's activation map, added when the head is global average pooling + one linear layer).")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Load a checkpoint that pickles Python objects beyond tensors (a whole model): that runs code from the file, so only for files you trust. State dicts, TorchScript and safetensors need no flag.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="OUT.onnx", help="Output file \\[default: the checkpoint's path with .onnx, or .fp16.onnx; for a folder, FOLDER.onnx beside it].")] = None,
) -> None:
    """Export a checkpoint to a verified, self-describing ONNX file.

    For a timm model, each preprocessing value left out comes from the checkpoint's args (or the
    folder's config.json), else timm's pretrained config for the model or tag; a note names each
    source. For other networks the defaults below apply.

    The graph takes uint8 RGB images (batch, height, width, 3) and returns float32 logits
    (batch, classes), and for a global-average-pooling + linear head also cam (batch, h, w),
    the top-1 class's activation map on the last feature map. Every export is checked with onnx.checker and compared with torch by
    onnxruntime at two input sizes before the file is written.
    """
    with _user_errors(ctx):
        try:
            from exporters import ExportOptions, export_checkpoint

            # Imported where they are used; checked here, before any work.
            if fp16:
                import onnxconverter_common  # noqa: F401
            if checkpoint.suffix == ".safetensors":
                import safetensors.torch  # noqa: F401
        except ImportError as exc:  # the export extra is not installed (`pip install ens` is core only)
            missing = (exc.name or "").partition(".")[0]
            if missing not in ("torch", "torchvision", "onnxconverter_common", "safetensors"):
                raise
            package = {"onnxconverter_common": "onnxconverter-common"}.get(missing, missing)
            raise EnsError(f"ens export needs {package}, which this install lacks: pip install 'ens[export]'") from None

        # An option left out (None) keeps ExportOptions' own default.
        preprocess = {"mean": _floats3(mean, "--mean") if mean is not None else None,
                      "std": _floats3(std, "--std") if std is not None else None,
                      "resize": resize, "crop_pct": crop_pct, "interpolation": interpolation}
        options = ExportOptions(
            arch=arch,
            arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs") if arch_kwargs else {},
            num_classes=num_classes,
            input_size=input_size,
            weights_key=weights_key,
            classes=classes,
            fp16=fp16,
            cam=not no_cam,
            trust_pickle=trust_pickle,
            **{k: v for k, v in preprocess.items() if v is not None},
        )
        result = export_checkpoint(checkpoint, output, options)
    meta = result.metadata
    shape = "any size" if meta.dynamic_size else f"fixed {meta.input_size} px"
    _echo(f"exported {meta.architecture}: {meta.num_classes} classes, {meta.input_size} px "
               f"({shape}), {meta.precision}, in {result.seconds:.1f} s")
    for note in result.notes:
        _echo(f"  note: {note}")
    for check in meta.verification:
        agree = round(check.top1_agreement * check.batch)
        _echo(f"  verified {check.precision} at {check.size} px: max |logit diff| "
                   f"{check.max_abs_diff:.2e}, top-1 agrees on {agree}/{check.batch}")
    size_mb = result.path.stat().st_size / 1e6
    _echo(f"wrote {result.path} ({size_mb:.1f} MB)")


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="An ONNX file written by `ens export`.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
) -> None:
    """Show the metadata `ens export` stored in an ONNX file."""
    with _user_errors(ctx):
        from ensemble.formats.model import read_metadata

        meta = read_metadata(model)
    values = dataclasses.asdict(meta)
    if as_json:
        for line in json.dumps(values, indent=2).splitlines():  # ensure_ascii: escapes in the strings
            _echo(line)
        return
    ids = values.pop("class_ids")
    values["class_ids"] = "output index" if ids is None else (
        f"{len(ids)} ids: {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}")
    checks = values.pop("verification")
    width = max(map(len, values))
    for key, value in values.items():
        _echo(f"{key:<{width}}  {value}")
    for check in checks:
        _echo(f"{'verified':<{width}}  {check['precision']} at {check['size']} px: max |logit diff| "
                   f"{check['max_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.0%} "
                   f"of {check['batch']}")


@app.command()
def infer(
    ctx: typer.Context,
    models: Annotated[list[Path], typer.Argument(metavar="MODEL.onnx...", help="ONNX files written by `ens export` (others: see --input-size).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Dataset folder in the iNaturalist layout, with --split.")] = None,
    split: Annotated[Optional[str], typer.Option(metavar="NAMES", help="Splits under --data, comma-separated: val means DIR/val2019.json (else val2018.json, val2017.json, iNat 2021's val.json, or the image folder DIR/val).", show_default="val,test")] = None,
    index: Annotated[Optional[Path], typer.Option(metavar="FILE.json", help="One split instead of --data: a COCO/iNat json, or a folder of images (ids are relative paths; links followed as ImageFolder follows them, each real folder once).")] = None,
    tta: Annotated[str, typer.Option(metavar="NAMES", help="Views beside identity, comma-separated: flip, scale, crop5, crop10 (= crop5 and flip); they combine. cam: a crop of where the model looks (its class activation map), classified again (flipped too with flip).")] = ",".join(InferOptions.tta),
    scales: Annotated[str, typer.Option(metavar="S,S,...", help="Factors of the model's input size for the scale views.")] = ",".join(f"{s:g}" for s in InferOptions.scales),
    cam_threshold: Annotated[Optional[float], typer.Option(help="cam view: keep the map at or above this fraction of its range (the part around the maximum).", show_default="0.2")] = None,
    cam_pad: Annotated[Optional[float], typer.Option(help="cam view: grow the box by this fraction of its size on each side.", show_default="0.1")] = None,
    cam_min: Annotated[Optional[float], typer.Option(help="cam view: the box is at least this fraction of the shorter side of what the model's full view sees.", show_default="0.25")] = None,
    merge: Annotated[str, typer.Option(help="How views merge: mean-logits, mean-probs (mean probability) or gmean (geometric mean of probabilities).")] = InferOptions.merge,
    keep_views: Annotated[bool, typer.Option("--keep-views", help="Also store every view's logits (views.npy).")] = InferOptions.keep_views,
    device: Annotated[str, typer.Option(help="auto (CUDA when onnxruntime offers it, else CPU), cpu, cuda or tensorrt.")] = InferOptions.device,
    batch_size: Annotated[int, typer.Option(help="Images per batch and per forward pass (each view of a batch is one pass).")] = InferOptions.batch_size,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes; 0 decodes in this process.", show_default="a quarter of the cores on CPU, all but one with a GPU")] = None,
    on_bad_image: Annotated[str, typer.Option(help="An unreadable image: fail (stop, naming it) or skip (leave it out, listed in the manifest).")] = InferOptions.on_bad_image,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Stores go to DIR/<model file stem>/<split>/ (DIR/<--name>/<split>/ with --name).")] = InferOptions.out,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="The store's folder name instead of the model file's stem (one model only): how fold0/model.onnx and fold1/model.onnx keep a store each, blended as two models. At most 200 characters; no '/', ',' or control character, not starting with '.'.", show_default="the file's stem")] = InferOptions.name,
    dtype: Annotated[str, typer.Option(help="Stored logits: float16 or float32.")] = InferOptions.dtype,
    chunk_size: Annotated[Optional[int], typer.Option(help="Images per resumable chunk (rounded up to a multiple of --batch-size). Left out: 1024, or fewer where every model's chunk (images x classes x (1 + kept views) in --dtype) would not fit --memory, or the size of an interrupted run's chunks, which then resume; one that cannot fit is refused. A complete store is kept at any chunk size.", show_default="1024, within --memory")] = InferOptions.chunk_size,
    input_size: Annotated[Optional[int], typer.Option(help="For ONNX files without ens metadata: input height and width.", show_default="the graph's, when fixed")] = None,
    mean: Annotated[Optional[str], typer.Option(metavar="R,G,B", help="For ONNX files without ens metadata that take float NCHW input: normalisation mean, fractions of 255.")] = None,
    std: Annotated[Optional[str], typer.Option(metavar="R,G,B", help="Likewise, the normalisation std.")] = None,
    resize: Annotated[Optional[str], typer.Option(help="For ONNX files without ens metadata: center-crop or squash.", show_default=DEFAULT_RESIZE)] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="For ONNX files without ens metadata: the center-crop fraction.", show_default=f"{DEFAULT_CROP_PCT:g}")] = None,
    cudnn_search: Annotated[Optional[str], typer.Option(help="GPU: cuDNN's convolution algorithm search, heuristic, exhaustive (slow first batch per input shape) or default.", show_default=InferOptions.cudnn_search)] = None,
    gpu_mem_limit: Annotated[Optional[float], typer.Option(metavar="GIB", help="GPU: memory each model's session may hold, in GiB.", show_default="no limit")] = None,
    trt_fp16: Annotated[bool, typer.Option("--trt-fp16", help="TensorRT: float16 engines for float32 models too (float16 models always get them).")] = InferOptions.trt_fp16,
    engine: Annotated[str, typer.Option(metavar="local|ray", help="local (this machine) or ray (a Ray cluster: decoding in CPU tasks, one model actor per GPU; needs the optional extra ray); both write the same stores.")] = InferOptions.engine,
    ray_address: Annotated[Optional[str], typer.Option(metavar="auto|HOST:PORT", help="--engine ray: the cluster to join.", show_default="RAY_ADDRESS, else a running local cluster, else a new one")] = None,
    memory: MemoryOption = None,
) -> None:
    """Run models with test-time augmentation into logit stores.

    One store per model and split. Each image is decoded once for all models and views. A killed run, started again with the
    same arguments, resumes from its last saved chunk. A store holds logits.npy (rows, classes),
    ids.npy (image ids in row order), manifest.json and, with --keep-views, views.npy.
    """
    with _user_errors(ctx):
        from ensemble.cli_progress import InferProgress, format_seconds
        from ensemble.formats.dataset import load_split, resolve_splits
        from ensemble.inference.run import infer as run_infer
        from ensemble.formats.model import check_preprocess

        if (data is None) == (index is None):
            raise EnsError("give the images with either --data DIR [--split val,test] or --index FILE.json")
        if split is not None and data is None:
            raise EnsError("--split names splits under --data DIR")
        if data is not None:
            names = [s.strip() for s in (split or "val,test").split(",") if s.strip()]
            if not names:
                raise EnsError(f"--split {split!r}: name at least one split, e.g. val,test")
            splits = [load_split(p, name) for p, name in zip(resolve_splits(data, names), names)]
        else:
            splits = [load_split(index)]
        try:
            scale_values = tuple(float(s) for s in scales.split(","))
        except ValueError:
            raise EnsError(f"--scales {scales}: expected numbers separated by commas, e.g. 0.875,1,1.143") from None
        foreign = ForeignPreprocess(
            input_size=input_size,
            mean=_floats3(mean, "--mean") if mean is not None else None,
            std=_floats3(std, "--std") if std is not None else None,
            resize=resize,
            crop_pct=crop_pct,
        )
        check_preprocess(mean=foreign.mean, std=foreign.std, resize=resize, crop_pct=crop_pct)
        options = InferOptions(
            tta=tuple(t.strip() for t in tta.split(",") if t.strip()),
            scales=scale_values,
            cam_threshold=cam_threshold,
            cam_pad=cam_pad,
            cam_min=cam_min,
            merge=merge,
            keep_views=keep_views,
            device=device,
            batch_size=batch_size,
            workers=workers,
            on_bad_image=on_bad_image,
            dtype=dtype,
            chunk_size=chunk_size,
            memory=_memory.memory_budget(memory),
            out=out,
            name=name,
            foreign=foreign,
            gpu_mem_limit=gpu_mem_limit,
            trt_fp16=trt_fp16,
            engine=engine,
            ray_address=ray_address,
            # Options left out (None) keep InferOptions' own defaults (the ones --help shows).
            **({"cudnn_search": cudnn_search} if cudnn_search is not None else {}),
        )
        with InferProgress() as progress:
            result = run_infer(models, splits, options, progress)
    for store in result.stores:
        if not store.computed:
            continue
        skipped = f", {store.skipped} skipped" if store.skipped else ""
        _echo(f"wrote {store.path}: {store.rows} x {store.classes} {dtype}{skipped}")
    _echo(f"{len(result.stores)} stores ({sum(s.computed for s in result.stores)} computed), "
               f"{len(models)} models, {len(splits)} splits, tta {','.join(options.tta) or 'none'} "
               f"({merge}); decoded {result.decodes} images in {format_seconds(result.seconds)} "
               f"on {result.provider}")


@app.command()
def blend(
    ctx: typer.Context,
    runs: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder of logit stores written by `ens infer` \\[default: runs; with --weights, runs when it holds the applied split's stores, else the folder blend.json records].", show_default=False)] = None,
    models: Annotated[Optional[str], typer.Option(metavar="a,b,c", help="Models (folders under --runs) to blend \\[default: every model with a store for the split].")] = None,
    optimize: Annotated[Optional[str], typer.Option(metavar="SPLIT", help="Labelled split to fit the weights on, e.g. val.")] = None,
    apply: Annotated[Optional[str], typer.Option(metavar="SPLIT", help="Split to fuse into top-k predictions \\[default: test, when every model has it; with --weights, test].")] = None,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Competition folder: labels come from its file of the fitted split (val2019.json, val.json, ...) \\[default: the json the stores were made from].")] = None,
    method: Annotated[Optional[str], typer.Option(help="uniform | nll | logit | greedy | accuracy.", show_default="nll")] = None,
    temperature: Annotated[bool, typer.Option("--temperature", help="Fit one temperature per member before blending.")] = False,
    views: Annotated[bool, typer.Option("--views", help="Weight (model, TTA view) pairs; needs stores made with --keep-views.")] = False,
    cv: Annotated[Optional[int], typer.Option(metavar="K", help="Folds of the cross-validated estimate (at most the fitted split's rows).", show_default="5")] = None,
    fallback: Annotated[Optional[str], typer.Option(metavar="uniform", help="Use equal weights when the method does not beat them on CV.")] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="blend.json", help="Apply saved weights instead of fitting.")] = None,
    top_k: Annotated[int, typer.Option(help="Categories per image in predictions.csv.")] = 5,
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Blend folder, a folder of its own (never a logit store nor a folder of stores) \\[default: blends/<method>; with --weights, <its folder>-<split> beside it].")] = None,
    prior: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Training class counts to correct the blend for (long-tail logit adjustment): a COCO/iNat json (its annotations are counted, e.g. data/train2019.json), a JSON object {\"category_id\": count} or a CSV category_id,count.")] = None,
    prior_tau: Annotated[Optional[str], typer.Option(metavar="auto|FLOAT", help="Strength of the prior correction: auto fits it with the weights on the fitted split; a number from 0 (none) to 3 fixes it (1 divides by the prior once). With --method accuracy a fixed tau also keeps far fewer rival pairs in memory.", show_default="auto, with --prior")] = None,
    geo_prior: Annotated[Optional[str], typer.Option(metavar="TRAIN_JSON", help="Training json whose images' latitude, longitude and date (iNat 2021's train.json) give a location/date prior, combined with the blend as p(y | image) (p(y | place) / p(y))^beta, beta from --geo-weight; the places of the fitted and applied images come from their split jsons. With --weights: where the saved blend's training json is now \\[default: the path blend.json records].")] = None,
    geo_weight: Annotated[Optional[str], typer.Option(metavar="auto|FLOAT", help="Weight of the geo prior: auto fits it on the fitted split inside the CV; a number from 0 (off) to 3 fixes it.", show_default="auto, with --geo-prior")] = None,
    memory: MemoryOption = None,
) -> None:
    """Fit blend weights on validation, report honest CV estimates, fuse the test logits.

    Writes DIR/blend.json (weights, temperatures, prior correction, geo prior, CV table, input hashes) and
    DIR/predictions.csv (id, top-k category ids and probabilities) for `ens submit`.
    """
    with _user_errors(ctx):
        from ensemble.blend.run import BlendOptions, run_blend

        model_list = tuple(m.strip() for m in models.split(",") if m.strip()) if models else None
        if geo_prior == "":  # not Path(""), which is "."
            raise EnsError("--geo-prior: the path is empty; give the training json (e.g. data/train.json)")
        options = BlendOptions(runs=runs, models=model_list, optimize=optimize, apply=apply, data=data,
                               method=method, temperature=temperature, views=views, cv=cv, fallback=fallback,
                               weights=weights, top_k=top_k, out=out, prior=prior, prior_tau=prior_tau,
                               geo_prior=None if geo_prior is None else Path(geo_prior), geo_weight=geo_weight,
                               memory=_memory.memory_budget(memory))
        result = run_blend(options)
    record = result.record
    for note in result.notes:
        _echo(f"note: {note}")
    if record.cv is not None and record.applied_from is None:
        _print_cv_table(record)
    _echo("weights: " + ", ".join(f"{name} {w:.3f}" for name, w in record.weights.items()))
    if record.temperatures:
        _echo("temperatures: " + ", ".join(f"{n} {t:.2f}" for n, t in record.temperatures.items()))
    if record.prior is not None:
        _echo(_prior_line(record))
    if record.geo is not None:
        _echo(_geo_line(record))
    _echo(f"wrote {result.out / 'blend.json'}")
    if result.predictions is not None:
        _echo(f"wrote {result.predictions} ({result.rows} image{'' if result.rows == 1 else 's'} of "
              f"{record.apply.split}, top-{result.top_k})")


def _prior_line(record) -> str:
    """What the blend's prior correction is (``record``: a BlendRecord with one) and where its
    tau came from."""
    prior = record.prior
    if record.applied_from is not None:
        how = f"from {record.applied_from}"
    elif prior.tau_fitted:
        taus = record.cv.fold_taus if record.cv is not None else ()
        how = f"fitted with the weights on {record.optimize.split}" + (
            f"; {min(taus):.3f}-{max(taus):.3f} in the CV folds" if taus else "")
    else:
        how = "given"
    counts = [c for c in prior.counts if c > 0] or [0]
    return (f"prior: tau {prior.tau:.3f} ({how}); {prior.file}, {len(prior.counts)} classes, "
            f"{min(counts)}-{max(counts)} training images per class")


def _geo_line(record) -> str:
    """What the blend's geo prior is (``record``: a BlendRecord with one) and where its beta came
    from."""
    geo = record.geo
    if record.applied_from is not None:
        how = f"from {record.applied_from}"
    elif geo.fitted:
        betas = (record.cv.fold_betas or ()) if record.cv is not None else ()
        how = f"fitted on {record.optimize.split} in the CV" + (
            f"; {min(betas):.3f}-{max(betas):.3f} in the CV folds" if betas else "")
    else:
        how = "given"
    no_place = ", ".join(f"{printable(split)} {count:,}" for split, count in geo.no_place.items())
    return (f"geo prior: beta {geo.beta:.3f} ({how}); {printable(geo.file)}, {geo.used:,} observations used, "
            f"{geo.skipped_total:,} skipped; images without a usable place: {no_place or 'none'}")


def _geo_header(record) -> str:
    """What the CV table's +geo rows are (none without them)."""
    if not getattr(record.cv, "geo", None):
        return ""
    geo = getattr(record, "geo", None)
    return ", +geo: with --geo-prior" + (", beta fitted per fold" if geo is not None and geo.fitted else "")


def _print_cv_table(record) -> None:
    """The CV table of a fitted BlendRecord."""
    cv = record.cv
    k = cv.top_k if record.class_ids is None else min(cv.top_k, len(record.class_ids))  # top-5 of 3 is top-3
    _echo(f"{cv.folds}-fold CV on {record.optimize.split} ({record.optimize.rows} images)"
               + (", temperatures fitted per fold" if cv.temperature else "")
               + (", +prior: corrected for --prior, tau fitted per fold" if cv.prior and record.prior.tau_fitted
                  else ", +prior: corrected for --prior" if cv.prior else "")
               + _geo_header(record))
    width = max(len(printable(r.name)) for r in cv.rows) + 2
    nll = max(8, *(len(f"{r.nll:.4f}") + 2 for r in cv.rows))  # an NLL of 100 or more needs a wider column
    _echo(f"{'':<{width}}{'top-1':>7}  {'95% interval':<16}{f'top-{k}':>7}{'NLL':>{nll}}")  # [0.1234, 0.5678]: 16
    for row in cv.rows:
        mark = "  <- used" if row.name == cv.chosen else ""
        _echo(f"{printable(row.name):<{width}}{row.top1:>7.4f}  [{row.top1_low:.4f}, {row.top1_high:.4f}]"
                   f"{row.topk:>7.4f}{row.nll:>{nll}.4f}{mark}")


@app.command()
def submit(
    ctx: typer.Context,
    predictions: Annotated[Optional[Path], typer.Argument(metavar="PREDICTIONS", help="The predictions.csv of `ens blend`, or the blend folder holding it.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Competition files: the test json (test2019.json, test2018.json or public_test.json, by --format) and the train/val jsons whose categories are the known category ids. The test json must be the one the predictions' stores were made from (checked by its sha256).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Competition format: inat2019 (id,predicted; 5 ids), inat2018 (3 ids) or inat2021 (Id,Predicted; 5 ids). One that disagrees with --data's layout is used, with a warning.", show_default="the one --data's test json names: test2019.json inat2019, test2018.json inat2018, public_test.json inat2021; else inat2019")] = None,
    name: Annotated[Optional[str], typer.Option(help="File name after the timestamp: letters, digits, '.', '_' and '-', a letter or digit first, short enough for the file system.", show_default="the blend folder's name, other characters as '_', cut to fit")] = None,
    sample: Annotated[Optional[Path], typer.Option(metavar="FILE", help="A sample submission (kaggle_sample_submission.csv): the ids must also be exactly its ids.")] = None,
    missing: Annotated[Optional[str], typer.Option(metavar="fail|prior", help="Test ids the predictions lack (images `ens infer --on-bad-image skip` left out): fail, or prior: give each the most frequent classes of the train json (else of the predictions), recorded in the ledger.", show_default="fail")] = None,
    compress: Annotated[bool, typer.Option("--gzip", help="Write submissions/<time>_<name>.csv.gz.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check, write and record the file; upload nothing.")] = False,
    competition: Annotated[Optional[str], typer.Option(metavar="C", help="Kaggle competition to upload to, e.g. inaturalist-2019-fgvc6 (with -m).")] = None,
    message: Annotated[Optional[str], typer.Option("-m", "--message", metavar="MSG", help="Submission message shown on Kaggle (with --competition).")] = None,
    check: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Only run the checks on FILE, any CSV (with --data, --format, --sample, --memory); write nothing.")] = None,
    retry: Annotated[Optional[int], typer.Option(metavar="ID", help="Upload ledger entry ID again (after upload-failed, or a dry run given --competition and -m).")] = None,
    memory: MemoryOption = None,
) -> None:
    """Write a checked Kaggle submission CSV, record it in the ledger and upload it.

    The CSV goes to submissions/<UTC time>_<name>.csv (submissions/ of the folder ens runs in:
    the work folder, which holds blends/), one row per test image, ids ascending.
    Before it is written it must hold every test id of --data exactly once and nothing else,
    integer ids, the format's number of category ids per row, and only category ids the
    dataset knows; and the stores it came from (found through blend.json) must have been made
    from --data's test json. Predictions that cannot be traced to their stores are written
    with a warning and recorded as unverified. Uploads use the official kaggle client, the
    optional kaggle extra of ens.
    """
    with _user_errors(ctx):
        from ensemble.submission.submit import CheckResult, SubmitRequest, run_request

        # Warnings are printed as they are found: before an upload, and also when it fails.
        result = run_request(SubmitRequest(predictions=predictions, data=data, format=fmt, name=name, sample=sample,
                                           missing=missing, compress=compress, dry_run=dry_run,
                                           competition=competition, message=message, check=check, retry=retry,
                                           memory=memory),
                             warn=lambda note: _echo(f"warning: {note}", err=True))
    if isinstance(result, CheckResult):
        fmt_spec = result.submission.format
        against = result.reference.test_source.name + (f" and {sample.name}" if sample is not None else "")
        _echo(f"ok: {check}: {len(result.submission.ids)} rows, {fmt_spec.name} ({fmt_spec.header}, "
                   f"{result.submission.categories.shape[1]} known category ids per row), every id of {against} once")
        _echo(f"note: --check verifies ids and categories only, not that the rows are predictions of the images "
              f"of {result.reference.test_source} (ens submit checks that for a blend's predictions)", err=True)
        return
    if retry is None:
        _echo(f"wrote {result.path} ({result.entry.rows} rows, {result.entry.format})")
        if result.fill is not None:
            fill = result.fill
            _echo(f"filled {result.entry.filled} row{'s' if result.entry.filled != 1 else ''} missing from "
                       f"the predictions with {fill.source} ({' '.join(map(str, fill.categories))}: the most "
                       f"frequent classes of {fill.origin})")
    entry = result.entry
    if retry is None and entry.geo_weight is not None:
        _echo(f"geo prior: weight {entry.geo_weight:.3f}, {_geo_source(entry)}")
    if result.receipt is None:
        _echo(f"ledger entry {entry.id}: not-uploaded (dry run)")
        return
    ref = f"Kaggle submission {result.receipt.ref}" if result.receipt.ref else "Kaggle"
    _echo(f"uploaded {result.path} to {entry.competition}: {ref} says {result.receipt.message!r}")
    _echo(f"ledger entry {entry.id}: uploaded; `ens submissions --refresh` fetches its score")


def _geo_source(entry) -> str:
    """The training json of a ledger entry's geo prior: its file name and the start of its sha256."""
    name = Path(entry.geo_file).name if entry.geo_file else "?"
    return f"{name} {entry.geo_sha256[:8]}" if entry.geo_sha256 else name


def _ledger_table(entries) -> list[str]:
    """The ledger as aligned text columns. CV is shown as top-1 error (1 - top-1 accuracy) so
    that it reads like the leaderboard scores of the top-1 competitions beside it; ``filled``
    (rows `--missing prior` filled, and from what) is blank where none was, and ``tau`` (the
    blend's long-tail prior correction, `ens blend --prior`) where the blend had none; ``geo``
    (the weight of the blend's geo prior, `ens blend --geo-prior`, and the training json it
    came from, by name and the start of its sha256) likewise; ``test set`` is the row's
    ``test_check`` (``unverified``: not traced to the test json), blank for rows written before
    it was recorded."""

    def number(value):
        return "" if value is None else f"{value:.4f}"

    def cv_error(e):
        if e.cv_top1 is None:
            return ""
        return f"{1 - e.cv_top1:.4f} ({1 - e.cv_top1_high:.4f}-{1 - e.cv_top1_low:.4f})"

    def filled(e):
        return f"{e.filled} {e.fill_source or ''}".rstrip() if e.filled else ""

    def geo(e):
        return "" if e.geo_weight is None else f"{e.geo_weight:.3f} {_geo_source(e)}"

    header = ("ID", "created", "file", "filled", "status", "test set", "kaggle", "CV top-1 error", "tau", "geo",
              "public", "private", "message")
    rows = [(str(e.id), e.created, e.file, filled(e), e.status, e.test_check or "", e.kaggle_status or "", cv_error(e),
             "" if e.prior_tau is None else f"{e.prior_tau:.3f}", geo(e), number(e.public_score),
             number(e.private_score), e.message or "") for e in entries]
    rows = [tuple(map(printable, row)) for row in rows]  # escaped first: the widths are of what is shown
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


@app.command()
def submissions(
    ctx: typer.Context,
    refresh: Annotated[bool, typer.Option("--refresh", help="First fetch status and scores of the uploaded files from Kaggle.")] = False,
) -> None:
    """List the submission ledger: files, CV estimates, upload status, leaderboard scores.

    The ledger is submissions/ledger.sqlite, one row per file `ens submit` wrote; the test set
    column says whether the rows were traced to the test json (verified) or not (unverified).
    """
    with _user_errors(ctx):
        from ensemble.submission.submit import SUBMISSIONS, refresh_scores
        from ensemble.formats.ledger import Ledger

        if refresh:
            result = refresh_scores()
            entries = result.entries
            _echo(f"Kaggle lists {result.found} of the {result.asked} files an upload was tried for"
                       if result.asked else "no upload tried yet: no scores to fetch")
        else:
            entries = Ledger(SUBMISSIONS).entries()
    if not entries:
        _echo(f"no submissions recorded in {SUBMISSIONS}/ yet")
        return
    for line in _ledger_table(entries):
        _echo(line)


@app.command()
def report(
    ctx: typer.Context,
    blend_dir: Annotated[Path, typer.Argument(metavar="BLEND_DIR", help="A blend folder written by `ens blend` (blends/<name>).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Dataset folder: the fitted split's labels and image files, and the training json (train2019.json) for the long-tail section and, when moved since the blend, the geo prior's.", show_default="the labels file blend.json names")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE.html", help="Where to write the page; an existing file there is replaced, never a folder, FIFO or device \\[default: BLEND_DIR/report.html].")] = None,
    runs: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder of the logit stores the blend was fitted on, looked in first (stores moved since `ens blend`).", show_default="the folder blend.json records, then runs/ beside blends/, then ./runs")] = None,
    memory: MemoryOption = None,
) -> None:
    """Write one self-contained HTML page that shows why the blend is what it is.

    Summary (CV top-1 against uniform and each model, the weights),
    calibration (reliability diagrams, ECE), diversity (error correlation),
    long tail (accuracy by class frequency), with a geo prior its gain by
    region and a map of the images, the most confidently wrong images, and
    CV against the leaderboard from the ledger. Opens offline.
    """
    with _user_errors(ctx):
        try:
            import matplotlib  # noqa: F401  (the report extra; imported where the figures are drawn)
        except ImportError:
            raise EnsError("ens report needs matplotlib, which this install lacks: pip install 'ens[report]'") from None
        from ensemble.report import write_report

        result = write_report(blend_dir, data, output, runs, _memory.memory_budget(memory))
    for note in result.notes:
        _echo(f"note: {note}")
    for section, line in result.missing.items():
        _echo(f"{section}: not shown: {line}")
    _echo(f"wrote {result.path} ({result.size / 1e6:.2f} MB, {sum(result.sections.values())} of "
               f"{len(result.sections)} sections)")



@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Work folder: data, checkpoints, runs, blends, submissions.")] = Path(".demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes and one epoch: the whole path in under a minute, not a meaningful table.")] = False,
    threads: Annotated[int, typer.Option(metavar="N", help="PyTorch threads training the networks. The table depends on N (same N, same table, whatever the cores or the load), so the README's is for the default.")] = 2,
) -> None:
    """Run the whole pipeline on a small competition built from real images.

    Builds an iNat-2019-layout competition from scikit-learn's digits (a long-tailed training
    split, balanced validation and test; every image with iNat 2021's place and date fields,
    each digit in its own regions), trains three architectures briefly on the CPU (cached),
    then runs ens export, ens infer --tta flip,scale, ens blend --optimize val (then again with
    --prior data/train2019.json, and with --geo-prior data/train2019.json too) and ens submit
    --dry-run, and scores the CSV against the answers. Reproducible: the same --threads prints
    the same table.
    """
    with _user_errors(ctx):
        try:
            # The trainer imports torch and torchvision, the data builder sklearn, where they are
            # used: checked here, before any work (sklearn only found, its import takes seconds).
            import importlib.util

            import torch  # noqa: F401
            import torchvision  # noqa: F401

            if importlib.util.find_spec("sklearn") is None:
                raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
            from ensemble.demo.run import DemoSettings, format_table, run_demo
        except ImportError as exc:  # the demo extra is not installed (`pip install ens` is core only)
            missing = (exc.name or "").partition(".")[0]
            if missing not in ("torch", "torchvision", "sklearn", "onnxconverter_common", "safetensors"):
                raise
            package = {"sklearn": "scikit-learn", "onnxconverter_common": "onnxconverter-common"}.get(missing, missing)
            raise EnsError(f"ens demo needs {package}, which this install lacks: pip install 'ens[demo]'") from None

        if threads < 1:
            raise EnsError(f"--threads {threads}: want 1 or more")
        settings = dataclasses.replace(DemoSettings.quick() if quick else DemoSettings(), threads=threads)
        result = run_demo(out, settings, log=_echo)
    _echo("")
    for line in format_table(result, settings.cv):
        _echo(line)
    _echo(f"demo finished in {result.seconds:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
