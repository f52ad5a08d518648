"""`deeplab segment`: the whole job, network, upsampling and CRF, over files, folders or a list on stdin."""

from __future__ import annotations

import sys

import click

from deeplab_cli.cli.common import (batch_options, crf_options, crf_overrides, download_progress, gather_jobs,
                                    output_options, pixel_limit, report)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@batch_options
@click.option("-m", "--model", help="A model name from `deeplab models list`, or a path to an .onnx file. [largefov-voc12; "
                                    "largefov-voc12-pytorch when the authors' weights cannot be had, said on stderr]")
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
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="The network's numerics [fp32, as the paper]: fp16 for GPUs; int8 for CPUs, faster and not the "
                   "paper's (`deeplab models quantize` makes it). Registry models only.")
@click.option("--fp16", is_flag=True, help="--precision fp16.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Run here, or on a Ray cluster (pip install 'deeplab-cli[ray]').")
@click.option("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance).")
@output_options
@click.option("--crf/--no-crf", default=True, show_default=True, help="Refine with the fully connected CRF.")
@crf_options
def segment(inputs, out, recursive, null, overwrite, shard, as_json, quiet, grace, max_pixels, model, device, threads,
            jobs, batch_size, max_size, pad_to, precision, fp16, engine, address, formats, alpha, crf, crf_backend, crf_params,
            **crf_opts):
    """Segment images: files, folders, or `-` for a list of paths on stdin.

    \b
      deeplab segment photos/ --out masks/
      find data -name '*.jpg' | deeplab segment - --out masks/ --json
      find data -name '*.jpg' -print0 | deeplab segment -0 - --out masks/
    """
    from deeplab_cli.run.segment import SegmentRequest, segment_images

    if fp16 and precision not in (None, "fp16"):
        raise click.BadOptionUsage("fp16", f"--fp16 is --precision fp16; it contradicts --precision {precision}")
    request = SegmentRequest(
        out=out, model=model, device=device, threads=threads, workers=jobs, batch_size=batch_size,
        max_size=max_size or None, pad_to=pad_to, precision=precision or ("fp16" if fp16 else "fp32"), engine=engine, address=address,
        formats=tuple(dict.fromkeys(formats or ("index",))), alpha=alpha, overwrite=overwrite,
        max_pixels=pixel_limit(max_pixels), crf=crf, crf_backend=crf_backend, crf_file=crf_params,
        crf_overrides=crf_overrides(crf_opts))
    run = segment_images(gather_jobs(inputs, recursive, shard, null), request, download_progress())
    stdout = sys.stdout
    if run.ray_driver:
        sys.stdout = sys.stderr  # Ray's driver prints cluster events to stdout, which carries results only
    try:
        sys.exit(report(run, as_json, quiet, grace, out=stdout))
    finally:
        sys.stdout = stdout
