"""Typed exceptions. Library code raises these; only the CLI turns them into messages and exit codes.

Every message is one line that names the file (or model) and the reason, so the CLI can print it as is.
"""


class DeeplabError(Exception):
    """Base class. `exit_code` is what the CLI exits with when this error ends a command."""

    exit_code = 1


class InputError(DeeplabError):
    """One input (image, logits file, label map) cannot be used; the rest of a batch goes on."""


class OutputError(DeeplabError):
    """An output could not be written. `stops_batch` when no later output could be either (the disk or
    quota is full, the file system turned read-only): the batch then takes no new images."""

    def __init__(self, message: str, stops_batch: bool = False):
        super().__init__(message)
        self.stops_batch = stops_batch


class WeightsError(DeeplabError):
    """A weight file is unreadable, truncated, or not DeepLab-LargeFOV."""


class ModelError(DeeplabError):
    """The model could not be found, fetched or loaded: nothing can run."""

    exit_code = 3


class DownloadError(ModelError):
    """A download failed or did not verify; nothing was cached."""


class RuntimeSetupError(ModelError):
    """onnxruntime could not start as asked (missing provider, conflicting packages)."""


class UsageError(DeeplabError):
    """The command line asks for something inconsistent."""

    exit_code = 2


class DenseCRFError(DeeplabError, ValueError):
    """A `deeplab_cli.densecrf` call that cannot run: arguments of the wrong shape or type (a ValueError,
    as pydensecrf raises), or a CRF the engine cannot compute exactly as pydensecrf does."""
