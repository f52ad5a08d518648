"""`deeplab crf` (the CRF stage alone, from saved scores) and `deeplab crf tune` (DeepLab's cross-validation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from deeplab_cli.cli.common import (EXIT_FAILED, EXIT_OK, batch_options, crf_options, crf_overrides, gather_jobs,
                                    jobs_option, output_options, pixel_limit, report)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.argument("scores_dir", metavar="SCORES", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--scores", "kind", type=click.Choice(["logits", "probs", "labels"]), default="logits", show_default=True,
              help="What SCORES holds per image: logits `segment -f logits` saved (NAME.logits.npz); any model's "
                   "(C, H, W) probabilities at any size (NAME.npy, NAME.npz, NAME.probs.npz); label maps (NAME.png).")
@click.option("--classes", type=click.IntRange(2, 256), default=21, show_default=True,
              help="Classes of probs and labels (VOC's 21; other counts name the classes 0..N-1).")
@click.option("--gt-prob", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--scores labels: the probability each label is given, the rest shared by the others [0.7].")
@click.option("--ignore-label", type=click.IntRange(0, 255),
              help="--scores labels: the label of pixels of unknown class (e.g. 255); they get no preference.")
@batch_options
@output_options
@jobs_option
@click.option("--device", default="cpu", show_default=True,
              help="Where --crf-backend onnx runs its graph: cpu, cuda or cuda:N; cuda makes onnx the default.")
@crf_options
def crf(inputs, scores_dir, kind, classes, gt_prob, ignore_label, out, recursive, null, overwrite, shard, as_json,
        quiet, grace, max_pixels, formats, alpha, jobs, device, crf_backend, crf_params, **crf_opts):
    """The CRF stage alone, on saved scores of any model: IMAGES... SCORES.

    SCORES holds a file per image, found by the image's path relative to the folders given (as
    `deeplab segment` mirrors them). Settings come from --crf-params and the options, DeepLab's by
    default. `deeplab crf tune --help` shows the cross-validation of the settings.

    \b
      deeplab segment photos/ --out logits/ -f logits --no-crf --device cuda
      deeplab crf photos/ logits/ --out masks/ --iters 10 -j 16
      deeplab crf photos/ probs/ --scores probs --out masks/
      deeplab crf photos/ pseudo/ --scores labels --gt-prob 0.7 --ignore-label 255 --out masks/
    """
    from deeplab_cli.run.refine import RefineRequest, refine_images

    request = RefineRequest(
        out=out, scores_dir=scores_dir, scores=kind, classes=classes, gt_prob=gt_prob, ignore_label=ignore_label,
        workers=jobs, device=device, formats=tuple(dict.fromkeys(formats or ("index",))), alpha=alpha,
        overwrite=overwrite, max_pixels=pixel_limit(max_pixels), crf_backend=crf_backend, crf_file=crf_params,
        crf_overrides=crf_overrides(crf_opts))
    sys.exit(report(refine_images(gather_jobs(inputs, recursive, shard, null), request), as_json, quiet, grace))


@click.command("crf tune")
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
