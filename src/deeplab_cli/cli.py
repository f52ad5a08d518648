"""The `deeplab` command. It parses options, calls one entry of the library and reports.

Exit codes: 0 every input done; 1 some inputs failed; 2 usage error; 3 the model or runtime could not
start; 143 / 130 stopped by SIGTERM / SIGINT (what was finished is kept; a rerun resumes). Heavy modules
(numpy, onnxruntime, OpenCV) are imported inside commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from deeplab_cli import __version__
from deeplab_cli.errors import DeeplabError

EXIT_OK, EXIT_FAILED = 0, 1  # usage errors exit 2 (click), model and runtime errors 3 (errors.ModelError)
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

    def resolve_command(self, ctx, args):
        # `deeplab crf IMAGES LOGITS` takes arguments, so `tune` cannot be a subcommand of a group there.
        if args[:2] == ["crf", "tune"]:
            return "crf tune", crf_tune, args[2:]
        return super().resolve_command(ctx, args)


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
    click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                 help="Output folder; it mirrors the input folders."),
    click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders."),
    click.option("-0", "--null", is_flag=True, help="The list on stdin (`-`) is NUL-separated, as `find -print0` writes it."),
    click.option("--overwrite", is_flag=True, help="Redo inputs whose outputs already exist."),
    click.option("--shard", metavar="K/N", help="Process only the K-th (from 0) of N slices of the inputs."),
    click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
    click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="SECONDS",
                 help="On SIGTERM or Ctrl-C, how long images in flight may take to finish before they are dropped."),
    click.option("--max-pixels", type=click.IntRange(min=0), envvar="DEEPLAB_MAX_PIXELS", show_envvar=True,
                 help="Refuse larger images before decoding them [500000000, a 20000x20000 scan passes]; 0: no limit."),
)

output_options = _options(
    click.option("-f", "--format", "formats", type=click.Choice(FORMATS), multiple=True,
                 help="Outputs to write (repeatable) [index]."),
    click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                 help="Colour weight for --format overlay."),
)

jobs_option = click.option("-j", "--jobs", type=click.IntRange(min=1), help="CPU worker processes [all cores].")

crf_options = _options(
    click.option("--crf-backend", type=click.Choice(["numba", "pydensecrf", "onnx"]),
                 help="What computes the CRF: numba, the project's engine (every core, exact); pydensecrf, the "
                      "reference it matches bit for bit (pip install 'deeplab-cli[pydensecrf]'); onnx, the "
                      "iterations as a graph on --device (equal to rounding). [onnx on a GPU, else numba]"),
    click.option("--crf-params", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="JSON file of CRF settings (as `deeplab crf tune` writes); options below override it."),
    click.option("--crf-iters", "--iters", type=click.IntRange(min=0), help="Mean-field iterations [10]."),
    click.option("--crf-bi-w", type=click.FloatRange(min=0), help="Bilateral kernel weight w1 [4]."),
    click.option("--crf-bi-xy-std", type=click.FloatRange(min=0, min_open=True), help="Bilateral spatial width sigma_alpha [121]."),
    click.option("--crf-bi-rgb-std", type=click.FloatRange(min=0, min_open=True), help="Bilateral colour width sigma_beta [5]."),
    click.option("--crf-pos-w", type=click.FloatRange(min=0), help="Gaussian kernel weight w2 [3]."),
    click.option("--crf-pos-xy-std", type=click.FloatRange(min=0, min_open=True), help="Gaussian kernel width sigma_gamma [3]."),
)

CRF_OPTION_KEYS = {"crf_iters": "iters", "crf_bi_w": "bi_w", "crf_bi_xy_std": "bi_xy_std",
                   "crf_bi_rgb_std": "bi_rgb_std", "crf_pos_w": "pos_w", "crf_pos_xy_std": "pos_xy_std"}


def crf_overrides(options: dict) -> dict:
    """The --crf-* options given, as CRFParams keys."""
    return {CRF_OPTION_KEYS[k]: v for k, v in options.items() if k in CRF_OPTION_KEYS and v is not None}


def pixel_limit(max_pixels: int | None) -> int | None:
    """--max-pixels (or DEEPLAB_MAX_PIXELS) -> the limit: the default when unset, None (no limit) for 0."""
    from deeplab_cli.io.images import DEFAULT_MAX_PIXELS
    return DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None)


def gather_jobs(inputs: tuple[str, ...], recursive: bool, shard_text: str | None, null: bool = False):
    """Jobs from paths and `-` (a list of paths on stdin), sharded if asked."""
    from deeplab_cli.io.inputs import gather
    return gather(inputs, recursive, shard_text, null, sys.stdin.buffer)


def report(run, as_json: bool, quiet: bool, grace: float = 0.0, out=None) -> int:
    """Drive `run` (a deeplab_cli.run.segment.Run), printing results as they come (paths or JSON lines on
    `out`, stdout by default; errors on stderr), then the summary; return the exit code."""
    from tqdm import tqdm

    from deeplab_cli.run import stop

    if run.total == 0 and not quiet:
        click.echo("deeplab: no inputs (folders are searched for image files; -r descends into sub-folders)", err=True)
    for note in run.notes if not quiet else ():
        click.echo(f"deeplab: {note}", err=True)

    def show(result, bar):
        if as_json:
            click.echo(file=out, message=json.dumps({
                "input": str(result.job.source), "outputs": [str(p) for p in result.outputs],
                "status": result.status, "error": result.error,
                "timings": {k: round(v, 4) for k, v in result.timings.items()}, "provider": run.provider,
            }))
        elif result.status == "ok":
            for path in result.outputs:
                click.echo(path, file=out)
        if result.error:
            bar.write(f"deeplab: {result.error}", file=sys.stderr)
        bar.update()

    with tqdm(total=run.total, disable=quiet or not sys.stderr.isatty(), unit="img", file=sys.stderr,
              dynamic_ncols=True) as bar:
        counts = run.drive(grace, lambda result: show(result, bar))
    if not quiet:
        click.echo(f"deeplab: {counts['ok']} done, {counts['skipped']} skipped (already done), "
                   f"{counts['error']} failed", err=True)
    if stop.requested():
        left = run.total - sum(counts.values())
        click.echo(f"deeplab: stopped ({stop.reason()}); {left} not done: run the same command again to resume",
                   err=True)
        return stop.exit_code() or EXIT_FAILED
    return EXIT_FAILED if counts["error"] else EXIT_OK


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
@click.argument("inputs", nargs=-1, required=True)
@batch_options
@click.option("-m", "--model", default="largefov-voc12", show_default=True,
              help="A model name from `deeplab models list`, or a path to an .onnx file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime threads of each CPU worker (default 1), or of the one process with -j 0 (all cores).")
@click.option("-j", "--jobs", type=click.IntRange(min=0),
              help="Worker processes: on the CPU each takes whole images through every stage (default: one per "
                   "core); with a GPU they run the CRF (default: every core); 0: everything in one process.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images of equal size per GPU network call [8].")
@click.option("--max-size", type=click.IntRange(min=0), default=513, show_default=True,
              help="Longer side the network sees; larger images are scaled down, results brought back. 0: no limit.")
@click.option("--pad-to", type=click.IntRange(min=1),
              help="Pad bottom/right with the mean to this size, as the paper's test protocol (513).")
@click.option("--fp16", is_flag=True, help="The float16 graph (for GPUs; a registry model only).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Run here, or on a Ray cluster (pip install 'deeplab-cli[ray]').")
@click.option("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance).")
@output_options
@click.option("--crf/--no-crf", default=True, show_default=True, help="Refine with the fully connected CRF.")
@crf_options
def segment(inputs, out, recursive, null, overwrite, shard, as_json, quiet, grace, max_pixels, model, device, threads,
            jobs, batch_size, max_size, pad_to, fp16, engine, address, formats, alpha, crf, crf_backend, crf_params,
            **crf_opts):
    """Segment images: files, folders, or `-` for a list of paths on stdin.

    \b
      deeplab segment photos/ --out masks/
      find data -name '*.jpg' | deeplab segment - --out masks/ --json
      find data -name '*.jpg' -print0 | deeplab segment -0 - --out masks/
    """
    from deeplab_cli.run.segment import SegmentRequest, segment_images

    request = SegmentRequest(
        out=out, model=model, device=device, threads=threads, workers=jobs, batch_size=batch_size,
        max_size=max_size or None, pad_to=pad_to, float16=fp16, engine=engine, address=address,
        formats=tuple(dict.fromkeys(formats or ("index",))), alpha=alpha, overwrite=overwrite,
        max_pixels=pixel_limit(max_pixels), crf=crf, crf_backend=crf_backend, crf_file=crf_params,
        crf_overrides=crf_overrides(crf_opts))
    run = segment_images(gather_jobs(inputs, recursive, shard, null), request, _download_progress())
    stdout = sys.stdout
    if run.ray_driver:
        sys.stdout = sys.stderr  # Ray's driver prints cluster events to stdout, which carries results only
    try:
        sys.exit(report(run, as_json, quiet, grace, out=stdout))
    finally:
        sys.stdout = stdout


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.argument("logits_dir", metavar="LOGITS", type=click.Path(exists=True, file_okay=False, path_type=Path))
@batch_options
@output_options
@jobs_option
@click.option("--device", default="cpu", show_default=True,
              help="Where --crf-backend onnx runs its graph: cpu, cuda or cuda:N; cuda makes onnx the default.")
@crf_options
def crf(inputs, logits_dir, out, recursive, null, overwrite, shard, as_json, quiet, grace, max_pixels, formats, alpha,
        jobs, device, crf_backend, crf_params, **crf_opts):
    """The CRF stage alone, from saved logits: IMAGES... LOGITS.

    LOGITS is the folder `deeplab segment IMAGES... --format logits` wrote; give the same IMAGES so the
    pairs are found by relative path. Settings come from --crf-params and the options, as for segment.
    `deeplab crf tune --help` shows the cross-validation of the settings.

    \b
      deeplab segment photos/ --out logits/ -f logits --no-crf --device cuda
      deeplab crf photos/ logits/ --out masks/ --iters 10 -j 16
      deeplab crf photos/ logits/ --out masks/ --device cuda
    """
    from deeplab_cli.run.refine import RefineRequest, refine_images

    request = RefineRequest(
        out=out, logits_dir=logits_dir, workers=jobs, device=device, formats=tuple(dict.fromkeys(formats or ("index",))),
        alpha=alpha, overwrite=overwrite, max_pixels=pixel_limit(max_pixels), crf_backend=crf_backend,
        crf_file=crf_params, crf_overrides=crf_overrides(crf_opts))
    sys.exit(report(refine_images(gather_jobs(inputs, recursive, shard, null), request), as_json, quiet, grace))


@cli.command("crf tune")
@click.argument("inputs", nargs=-1, required=True)
@click.argument("logits_dir", metavar="LOGITS", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gt", "gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of ground-truth palette PNGs, paired with the images by relative path.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("crf-params.json"),
              show_default=True, help="Where to write the best setting (for --crf-params).")
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders.")
@click.option("--limit", type=click.IntRange(min=1), help="Tune on the first N images only (the paper used 100).")
# DeepLab's initial search ranges for LargeFOV; w2 = 3 and sigma_gamma = 3 stay fixed.
@click.option("--bi-w", default="5:10:1", show_default=True, help="w1 values: START:STOP:STEP or a,b,c.")
@click.option("--bi-xy-std", default="50:100:10", show_default=True, help="sigma_alpha values.")
@click.option("--bi-rgb-std", default="3:10:1", show_default=True, help="sigma_beta values.")
@click.option("--num-classes", type=click.IntRange(min=1), default=21, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The table as one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@jobs_option
@crf_options
def crf_tune(inputs, logits_dir, gt_dir, out, recursive, limit, bi_w, bi_xy_std, bi_rgb_std, num_classes, as_json,
             quiet, jobs, crf_backend, crf_params, **crf_opts):
    """Cross-validate the CRF as DeepLab did: a grid over the bilateral kernel, ranked by mean IoU.

    \b
      deeplab crf tune val/images val/logits --gt val/labels --limit 100 -o best.json
      deeplab crf val/images val/logits --out masks/ --crf-params best.json
    """
    from tqdm import tqdm

    from deeplab_cli.crf import check_backend, params, tune
    from deeplab_cli.run import crf_tune, scheduling

    try:
        ranges = {"bi_w": tune.parse_values(bi_w), "bi_xy_std": tune.parse_values(bi_xy_std),
                  "bi_rgb_std": tune.parse_values(bi_rgb_std)}
        settings = tune.grid(params.merge({}, crf_params, crf_overrides(crf_opts)), ranges)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if crf_backend == "onnx":
        raise click.BadParameter("crf tune runs on the CPU: numba or pydensecrf", param_hint="--crf-backend")
    check_backend(crf_backend or "numba")
    samples = crf_tune.samples_of(gather_jobs(inputs, recursive, None)[:limit], logits_dir, gt_dir)
    cores = scheduling.usable_cores()
    search = crf_tune.GridSearch(samples, settings, num_classes, crf_backend or "numba", jobs or cores, cores)
    with tqdm(total=len(samples), disable=quiet or not sys.stderr.isatty(), unit="img", file=sys.stderr) as bar:
        for error in search:
            if error:
                bar.write(f"deeplab: {error}", file=sys.stderr)
            bar.update()
    table = search.table()
    table.write_best(out)
    if as_json:
        click.echo(json.dumps(table.to_json()))
    else:
        click.echo("\n".join(table.tsv()))
        click.echo(f"deeplab: best of {len(table.rows)} settings on {table.images} images written to {out}", err=True)
    sys.exit(EXIT_FAILED if table.failed else EXIT_OK)


@cli.command("eval")
@click.option("--pred", "pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of predicted index PNGs (deeplab's `index` format).")
@click.option("--gt", "gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of ground-truth palette PNGs; 255 is void.")
@click.option("--list", "list_file", type=click.File(), help="Image ids to evaluate, one per line (e.g. VOC's val.txt).")
@click.option("--num-classes", type=click.IntRange(min=1), default=21, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def evaluate(pred_dir, gt_dir, list_file, num_classes, as_json):
    """Mean IoU over a labelled set, as PASCAL VOC computes it (one confusion matrix for all images)."""
    from deeplab_cli.run.evaluate import Evaluation, image_ids

    evaluation = Evaluation(pred_dir, gt_dir, image_ids(gt_dir, list_file), num_classes)
    for problem in evaluation:
        if problem:
            click.echo(f"deeplab: {problem}", err=True)
    result = evaluation.result()
    if as_json:
        click.echo(json.dumps(result))
    else:
        for name, iou in result["per_class"].items():
            click.echo(f"{name:<14}{'-' if iou is None else f'{100 * iou:6.2f}'}")
        click.echo(f"{'mean IoU':<14}{100 * result['miou']:6.2f}\n{'pixel acc.':<14}{100 * result['pixel_accuracy']:6.2f}")
    sys.exit(EXIT_FAILED if result["problems"] else EXIT_OK)


@cli.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--name", default="largefov-voc12", show_default=True, help="Registry model whose classes and mean to use.")
@click.option("--fp16", is_flag=True, help="Half-precision graph for GPUs (inputs and outputs keep their types).")
@click.option("--with-probs", is_flag=True, help="Also output upsampled probabilities and labels (what a GPU run uses).")
def export(source, output, name, fp16, with_probs):
    """Convert a .caffemodel (either layout) or .npz of weights to ONNX."""
    from deeplab_cli.model import registry

    digest = registry.export(source, output, registry.get_model(name), float16=fp16, with_probs=with_probs)
    click.echo(f"{output}  (source sha256 {digest})")


@cli.group()
def models():
    """List, fetch and manage cached models (DEEPLAB_HOME, DEEPLAB_MIRROR, DEEPLAB_OFFLINE)."""


@models.command("list")
def models_list():
    """Known models: name, state, SHA-256 of the cached weights (- when unknown), description."""
    from deeplab_cli.model import registry

    for info in registry.known_models().values():
        record = registry.read_source(info)
        click.echo(f"{info.name}\t{registry.state(info)}\t{record.sha256 if record else '-'}\t{info.description}")


@models.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even when the model is cached and verified.")
def pull(name, force):
    """Download, verify, convert and cache a model; print its ONNX path (the SHA-256 goes to stderr)."""
    from deeplab_cli.model import registry

    info = registry.get_model(name)
    record = None if force else registry.verified(info)
    if record:
        click.echo(f"deeplab: {name} is already cached and verified (sha256 {record.sha256}); nothing to do, "
                   "--force downloads it again", err=True)
    else:
        registry.pull(info, progress=_download_progress())
        record = registry.read_source(info)
        click.echo(f"deeplab: {name}: sha256 {record.sha256} from {record.source}", err=True)
    click.echo(registry.onnx_path(info))  # on stdout either way, for scripts


@models.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default="largefov-voc12", show_default=True)
def models_import(file, name):
    """Convert a weight file you already have into the cache; print its ONNX path (the SHA-256 goes to stderr)."""
    from deeplab_cli.model import registry

    path, digest = registry.import_file(registry.get_model(name), file)
    click.echo(f"deeplab: {name}: sha256 {digest} imported from {file}", err=True)
    click.echo(path)


@models.command()
@click.argument("name")
def path(name):
    """Print the cached ONNX file of a model (exit 3 if not cached)."""
    from deeplab_cli.model import registry

    click.echo(registry.cached_onnx(registry.get_model(name)))


@models.command()
@click.argument("name")
def rm(name):
    """Delete a model from the cache."""
    from deeplab_cli.model import registry

    if not registry.remove(registry.get_model(name)):
        click.echo(f"deeplab: {name} was not cached", err=True)
