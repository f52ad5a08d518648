"""The `deeplab` command. It parses options and reports; the work is done by the library modules.

Exit codes: 0 every input done; 1 some inputs failed; 2 usage error; 3 the model or runtime could not
start. Heavy modules (numpy, onnxruntime, OpenCV) are imported inside commands so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from deeplab_cli import __version__
from deeplab_cli.errors import DeeplabError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3
FORMATS = ("index", "color", "overlay", "probs", "logits")


class _Failure(click.ClickException):
    """A library error shown as one line, with the exit code its type carries."""

    def __init__(self, error: DeeplabError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeeplabError as e:
            raise _Failure(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deeplab")
def cli():
    """Semantic segmentation with DeepLab-LargeFOV: ONNX network, bilinear upsampling, dense CRF."""


def main():
    cli(prog_name="deeplab")


def _options(*decorators):
    """Stack click options defined once and shared by several commands."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


batch_options = _options(
    click.argument("inputs", nargs=-1, required=True),
    click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                 help="Output folder; it mirrors the input folders."),
    click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders."),
    click.option("--overwrite", is_flag=True, help="Redo inputs whose outputs already exist."),
    click.option("--shard", metavar="K/N", help="Process only the K-th (from 0) of N slices of the inputs."),
    click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
)

crf_options = _options(
    click.option("--crf/--no-crf", default=True, show_default=True, help="Refine with the fully connected CRF."),
    click.option("--crf-params", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="JSON file of CRF settings (as `deeplab crf tune` writes); options below override it."),
    click.option("--crf-iters", type=click.IntRange(min=0), help="Mean-field iterations [10]."),
    click.option("--crf-bi-w", type=click.FloatRange(min=0), help="Bilateral kernel weight w1 [4]."),
    click.option("--crf-bi-xy-std", type=click.FloatRange(min=0, min_open=True), help="Bilateral spatial width sigma_alpha [121]."),
    click.option("--crf-bi-rgb-std", type=click.FloatRange(min=0, min_open=True), help="Bilateral colour width sigma_beta [5]."),
    click.option("--crf-pos-w", type=click.FloatRange(min=0), help="Gaussian kernel weight w2 [3]."),
    click.option("--crf-pos-xy-std", type=click.FloatRange(min=0, min_open=True), help="Gaussian kernel width sigma_gamma [3]."),
)

CRF_OPTION_KEYS = {"crf_iters": "iters", "crf_bi_w": "bi_w", "crf_bi_xy_std": "bi_xy_std",
                   "crf_bi_rgb_std": "bi_rgb_std", "crf_pos_w": "pos_w", "crf_pos_xy_std": "pos_xy_std"}


def crf_settings(base: dict, params_file: Path | None, options: dict):
    """CRFParams from the model's defaults, then the --crf-params file, then the explicit options."""
    from deeplab_cli.crf import CRFParams

    settings = dict(base)
    if params_file is not None:
        try:
            settings.update(json.loads(params_file.read_text()))
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{params_file}: {e}", param_hint="--crf-params") from None
    settings.update({CRF_OPTION_KEYS[k]: v for k, v in options.items() if k in CRF_OPTION_KEYS and v is not None})
    try:
        return CRFParams.from_dict(settings)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--crf-params") from None


def gather_jobs(inputs: tuple[str, ...], recursive: bool, shard_text: str | None):
    """Jobs from paths and `-` (a list of paths on stdin), sharded if asked."""
    from deeplab_cli import inputs as inp

    paths = []
    for item in inputs:
        paths.extend(inp.read_list(sys.stdin) if item == "-" else [item])
    jobs = inp.collect(paths, recursive)
    if shard_text:
        jobs = inp.shard(jobs, *inp.parse_shard(shard_text))
    return jobs


def report(results, total: int, as_json: bool, quiet: bool, provider: str) -> int:
    """Print results as they come (paths or JSON lines on stdout, errors on stderr); return the exit code."""
    from tqdm import tqdm

    counts = {"ok": 0, "skipped": 0, "error": 0}
    show_progress = not quiet and sys.stderr.isatty()
    with tqdm(total=total, disable=not show_progress, unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        for result in results:
            counts[result.status] += 1
            if as_json:
                click.echo(json.dumps({
                    "input": str(result.job.source), "outputs": [str(p) for p in result.outputs],
                    "status": result.status, "error": result.error,
                    "timings": {k: round(v, 4) for k, v in result.timings.items()}, "provider": provider,
                }))
            elif result.status == "ok":
                for path in result.outputs:
                    click.echo(path)
            if result.error:
                bar.write(f"deeplab: {result.error}", file=sys.stderr)
            bar.update()
    if not quiet:
        click.echo(f"deeplab: {counts['ok']} done, {counts['skipped']} skipped (already done), "
                   f"{counts['error']} failed", err=True)
    return EXIT_FAILED if counts["error"] else EXIT_OK


def resolve_model(model: str, float16: bool = False):
    """--model NAME (from the registry, pulled when missing) or a path to an .onnx file -> (path, CRF defaults)."""
    from deeplab_cli import registry

    if model.endswith(".onnx") or os.sep in model:
        return Path(model), {}
    info = registry.get_model(model)
    return registry.ensure(info, float16, progress=_download_progress()), info.crf


def _download_progress():
    from tqdm import tqdm

    bar = None

    def progress(received: int, total: int | None):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                       disable=not sys.stderr.isatty())
        bar.update(received)
    return progress


@cli.command()
@batch_options
@click.option("-m", "--model", default="largefov-voc12", show_default=True,
              help="A model name from `deeplab models list`, or a path to an .onnx file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime threads (default: all cores).")
@click.option("--max-size", type=click.IntRange(min=0), default=513, show_default=True,
              help="Longer side the network sees; larger images are scaled down, results brought back. 0: no limit.")
@click.option("--pad-to", type=click.IntRange(min=1), help="Pad bottom/right with the mean to this size, as the paper's test protocol (513).")
@click.option("-f", "--format", "formats", type=click.Choice(FORMATS), multiple=True,
              help="Outputs to write (repeatable) [index].")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Colour weight for --format overlay.")
@crf_options
def segment(inputs, out, recursive, overwrite, shard, as_json, quiet, model, device, threads, max_size, pad_to,
            formats, alpha, crf, crf_params, **crf_opts):
    """Segment images: files, folders, or `-` for a list of paths on stdin.

    \b
      deeplab segment photos/ --out masks/
      find data -name '*.jpg' | deeplab segment - --out masks/ --json
    """
    from deeplab_cli import runner
    from deeplab_cli.outputs import voc_palette, write_classes_json
    from deeplab_cli.runtime import open_session

    jobs = gather_jobs(inputs, recursive, shard)
    model_path, crf_defaults = resolve_model(model)
    params = crf_settings(crf_defaults, crf_params, crf_opts) if crf else None
    try:
        session = open_session(model_path, device, threads)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if device == "auto" and not quiet:
        click.echo(f"deeplab: running on {session.provider}", err=True)
    settings = runner.Settings(out=out, formats=tuple(dict.fromkeys(formats or ("index",))),
                               max_size=max_size or None, pad_to=pad_to, crf=params, alpha=alpha,
                               overwrite=overwrite)
    write_classes_json(out / "classes.json", session.classes, voc_palette())
    results = runner.segment(jobs, session, settings)
    sys.exit(report(results, len(jobs), as_json, quiet, session.provider))


@cli.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--name", default="largefov-voc12", show_default=True, help="Registry model whose classes and mean to use.")
@click.option("--fp16", is_flag=True, help="Half-precision graph for GPUs (inputs and outputs keep their types).")
def export(source, output, name, fp16):
    """Convert a .caffemodel (either layout) or .npz of weights to ONNX."""
    from deeplab_cli.export import export as run_export
    from deeplab_cli.registry import get_model

    digest = run_export(source, output, get_model(name), float16=fp16)
    click.echo(f"{output}  (source sha256 {digest})")


@cli.group()
def models():
    """List, fetch and manage cached models (DEEPLAB_HOME, DEEPLAB_MIRROR, DEEPLAB_OFFLINE)."""


@models.command("list")
def models_list():
    """Known models and whether each is in the cache."""
    from deeplab_cli import registry

    for info in registry.known_models().values():
        state = "cached" if registry.onnx_path(info).is_file() else "not cached"
        click.echo(f"{info.name}\t{state}\t{info.description}")


@models.command()
@click.argument("name")
def pull(name):
    """Download, verify, convert and cache a model."""
    from deeplab_cli import registry

    path = registry.pull(registry.get_model(name), progress=_download_progress())
    click.echo(path)


@models.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default="largefov-voc12", show_default=True)
def models_import(file, name):
    """Convert a weight file you already have into the cache, and print its SHA-256."""
    from deeplab_cli import registry

    path, digest = registry.import_file(registry.get_model(name), file)
    click.echo(f"{path}\nsha256 {digest}")


@models.command()
@click.argument("name")
def path(name):
    """Print the cached ONNX file of a model (exit 3 if not cached)."""
    from deeplab_cli import registry
    from deeplab_cli.errors import ModelError

    info = registry.get_model(name)
    onnx_file = registry.onnx_path(info)
    if not onnx_file.is_file():
        raise ModelError(f"{name} is not in the cache ({registry.cache_dir()}); {registry.how_to_get(info)}")
    click.echo(onnx_file)


@models.command()
@click.argument("name")
def rm(name):
    """Delete a model from the cache."""
    from deeplab_cli import registry

    if not registry.remove(registry.get_model(name)):
        click.echo(f"deeplab: {name} was not cached", err=True)
