"""`deeplab export` and `deeplab models`: weight files to ONNX graphs, and the cache of known models."""

from __future__ import annotations

from pathlib import Path

import click

from deeplab_cli.cli.common import download_progress


@click.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option("--name", help="Registry model whose layout, classes and mean to use [largefov-voc12-pytorch for a .pth, "
                              "else largefov-voc12].")
@click.option("--fp16", is_flag=True, help="Half-precision graph for GPUs (inputs and outputs keep their types).")
@click.option("--with-probs", is_flag=True, help="Also output upsampled probabilities and labels (what a GPU run uses).")
def export(source, output, name, fp16, with_probs):
    """Convert a .caffemodel (either layout), .pth (a PyTorch port's state_dict) or .npz of weights to ONNX."""
    from deeplab_cli.model import registry

    info = registry.get_model(name) if name else registry.model_for_file(source)
    digest = registry.export(source, output, info, float16=fp16, with_probs=with_probs)
    click.echo(f"{output}  (source sha256 {digest})")


@click.group()
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
        registry.pull(info, progress=download_progress())
        record = registry.read_source(info)
        click.echo(f"deeplab: {name}: sha256 {record.sha256} from {record.source}", err=True)
    click.echo(registry.onnx_path(info))  # on stdout either way, for scripts


@models.command()
@click.argument("name", required=False)
@click.option("--calibrate", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of images like the ones you will segment (sub-folders included).")
@click.option("--count", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images to calibrate on; up to 8 of the next ones measure the result.")
def quantize(name, folder, count):
    """Make the int8 graph of a model for `segment --precision int8`; print its path.

    It is calibrated on your images, then compared with float32 after the CRF on other images of the
    folder: the share of pixels whose label is float32's goes to stderr, with a warning when it is low.
    """
    from deeplab_cli.model import registry
    from deeplab_cli.run.quantize import LOW_AGREEMENT, quantize_model

    info = registry.get_model(name) if name else registry.ensure_default(progress=download_progress())[0]
    report = quantize_model(info, folder, count, download_progress())
    for problem in report.problems:
        click.echo(f"deeplab: {problem}", err=True)
    click.echo(f"deeplab: {info.name}: int8 graph calibrated on {report.calibrated} images", err=True)
    if report.mean is None:
        click.echo(f"deeplab: no image of {folder} was left to measure it on: give it more than --count images",
                   err=True)
    else:
        lowest = min(report.agreement.values())
        click.echo(f"deeplab: int8 labels equal fp32's on {100 * report.mean:.2f}% of pixels after the CRF "
                   f"({len(report.agreement)} held-out images, lowest {100 * lowest:.2f}%)", err=True)
    if report.low:
        click.echo(f"deeplab: warning: below {100 * LOW_AGREEMENT:.0f}%: int8 changes many labels on images like "
                   "these; calibrate on more of them, or keep fp32", err=True)
    click.echo(report.path)


@models.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="[largefov-voc12-pytorch for a .pth, else largefov-voc12]")
def models_import(file, name):
    """Convert a weight file you already have into the cache; print its ONNX path (the SHA-256 goes to stderr)."""
    from deeplab_cli.model import registry

    info = registry.get_model(name) if name else registry.model_for_file(file)
    path, digest = registry.import_file(info, file)
    click.echo(f"deeplab: {info.name}: sha256 {digest} imported from {file}", err=True)
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
