"""`deeplab eval`: mean IoU over a labelled set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from deeplab_cli.cli.common import EXIT_FAILED, EXIT_OK


@click.command("eval")
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
