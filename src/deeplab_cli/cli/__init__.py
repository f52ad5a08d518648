"""The `deeplab` command. It parses options, calls one entry of the library and reports.

Exit codes: 0 every input done; 1 some inputs failed; 2 usage error; 3 the model or runtime could not
start; 143 / 130 stopped by SIGTERM / SIGINT (what was finished is kept; a rerun resumes). Heavy modules
(numpy, onnxruntime, OpenCV) are imported inside commands so that `--help` is instant.
"""

from __future__ import annotations

import click

from deeplab_cli import __version__
from deeplab_cli.cli.crf import crf, crf_tune
from deeplab_cli.cli.evaluate import evaluate
from deeplab_cli.cli.models import export, models
from deeplab_cli.cli.segment import segment
from deeplab_cli.errors import DeeplabError


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


for command in (segment, crf, evaluate, export, models):
    cli.add_command(command)
