"""What the commands share: option groups defined once, the gathering of inputs, and the reporting of a
run (results on stdout, progress and errors on stderr, the exit code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_FAILED = 0, 1  # usage errors exit 2 (click), model and runtime errors 3 (errors.ModelError)
FORMATS = ("index", "color", "overlay", "probs", "logits")


def options_group(*decorators):
    """Stack click options defined once and shared by several commands."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


batch_options = options_group(
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

output_options = options_group(
    click.option("-f", "--format", "formats", type=click.Choice(FORMATS), multiple=True,
                 help="Outputs to write (repeatable) [index]."),
    click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                 help="Colour weight for --format overlay."),
)

jobs_option = click.option("-j", "--jobs", type=click.IntRange(min=1), help="CPU worker processes [all cores].")

crf_options = options_group(
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
    for note in [*run.warnings, *(run.notes if not quiet else ())]:
        click.echo(f"deeplab: {note}", err=True)

    def show(result, bar):
        if as_json:
            click.echo(file=out, message=json.dumps({
                "input": str(result.job.source), "outputs": [str(p) for p in result.outputs],
                "status": result.status, "error": result.error,
                "timings": {k: round(v, 4) for k, v in result.timings.items()}, "provider": run.provider,
                **({"model": run.model} if run.model else {}),
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


def download_progress():
    from tqdm import tqdm
    bar = None

    def progress(received: int, total: int | None):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                       disable=not sys.stderr.isatty())
        bar.update(received)
    return progress
