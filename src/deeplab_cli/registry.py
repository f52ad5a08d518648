"""The models the project knows (`models/*.toml`) and the local cache of their weights and graphs.

Cache layout: `$DEEPLAB_HOME/<name>/<source file>` (the published weights, kept for re-conversion) and
`$DEEPLAB_HOME/<name>/model.onnx`, with `model.gpu.onnx` / `model.gpu.fp16.onnx` (the graph with the
upsampling and softmax inside, in float32 / float16) converted from the weights on first use. DEEPLAB_HOME defaults to
the user cache directory; point it at a shared filesystem to pull once for a whole cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deeplab_cli.errors import DownloadError, ModelError, WeightsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "largefov-voc12"
ENV_HOME, ENV_MIRROR, ENV_OFFLINE = "DEEPLAB_HOME", "DEEPLAB_MIRROR", "DEEPLAB_OFFLINE"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    file: str
    urls: tuple[str, ...]
    sha256: str | None
    classes: tuple[str, ...]
    mean_bgr: tuple[float, float, float]
    fc8: str
    crf: dict = field(default_factory=dict)


def _models_dir() -> Path:
    # A wheel carries models/ inside the package; a source checkout has it at the repository root.
    packaged = Path(__file__).with_name("models")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "models"


def known_models() -> dict[str, ModelInfo]:
    models = {}
    for path in sorted(_models_dir().glob("*.toml")):
        data = tomllib.loads(path.read_text())
        models[data["name"]] = ModelInfo(
            name=data["name"], description=data.get("description", ""), file=data["file"],
            urls=tuple(data.get("urls", ())), sha256=data.get("sha256") or None,
            classes=tuple(data["classes"]), mean_bgr=tuple(data["mean_bgr"]), fc8=data["fc8"],
            crf=dict(data.get("crf", {})),
        )
    return models


def get_model(name: str) -> ModelInfo:
    models = known_models()
    if name not in models:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(models) or 'none'})")
    return models[name]


def cache_dir() -> Path:
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("deeplab-cli"))


def offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


def weights_path(info: ModelInfo) -> Path:
    return cache_dir() / info.name / info.file


def onnx_path(info: ModelInfo, float16: bool = False, gpu: bool = False) -> Path:
    return cache_dir() / info.name / ("model" + ".gpu" * gpu + ".fp16" * float16 + ".onnx")


def download_urls(info: ModelInfo) -> list[str]:
    """The published URLs, or only the mirror's when DEEPLAB_MIRROR names one (nodes that see no internet)."""
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    return [f"{mirror.rstrip('/')}/{info.file}"] if mirror else list(info.urls)


def how_to_get(info: ModelInfo) -> str:
    return (f"run `deeplab models pull {info.name}`, or download {info.file} from {info.urls[0]} "
            f"and run `deeplab models import {info.file} --name {info.name}`") if info.urls else (
            f"run `deeplab models import FILE --name {info.name}`")


def pull(info: ModelInfo, progress=None) -> Path:
    """Download the weights, verify, convert, and cache both. Returns the ONNX path."""
    from deeplab_cli.download import fetch
    from deeplab_cli.export import export

    if offline():
        raise ModelError(f"{info.name}: not downloading, {ENV_OFFLINE} is set; {how_to_get(info)} on a machine "
                         f"that can reach {info.urls[0] if info.urls else 'the weights'}")
    directory = weights_path(info).parent
    with fetch(download_urls(info), directory, sha256=info.sha256, progress=progress) as (tmp, _):
        # Convert before renaming: a download that is not LargeFOV is refused and caches nothing.
        try:
            export(tmp, onnx_path(info), info)
        except WeightsError as e:
            # A fetch that brought the wrong file is a fetch failure (exit 3, and ensure() adds how to get
            # the right one); the temporary name in the message would point at a file already gone.
            reason = str(e).removeprefix(f"{tmp}: ")
            raise DownloadError(f"{info.name}: the downloaded {info.file} is not usable: {reason}") from None
        os.replace(tmp, weights_path(info))
    return onnx_path(info)


def import_file(info: ModelInfo, source: Path) -> tuple[Path, str]:
    """Convert a local weight file into the cache under `info.name`. Returns (ONNX path, SHA-256)."""
    from deeplab_cli.export import export
    from deeplab_cli.outputs import atomic_write
    from deeplab_cli.weights import sha256_file

    digest = sha256_file(source)
    if info.sha256 and digest != info.sha256.lower():
        raise ModelError(f"{source}: SHA-256 {digest} does not match {info.name}'s {info.sha256}")
    export(source, onnx_path(info), info)
    if source.resolve() != weights_path(info).resolve():
        atomic_write(weights_path(info), lambda tmp: shutil.copyfile(source, tmp))
    return onnx_path(info), digest


def ensure(info: ModelInfo, float16: bool = False, gpu: bool = False, progress=None) -> Path:
    """The cached ONNX graph, pulled (unless offline) or converted from cached weights when missing."""
    from deeplab_cli.export import export

    path = onnx_path(info, float16, gpu)
    if path.is_file():
        return path
    if not weights_path(info).is_file():
        if offline():
            raise ModelError(f"{info.name} is not in the cache ({cache_dir()}) and {ENV_OFFLINE} is set; "
                             f"{how_to_get(info)}")
        try:
            pull(info, progress)
        except ModelError as e:
            raise ModelError(f"{info.name} is not in the cache ({cache_dir()}) and could not be fetched "
                             f"({e}); {how_to_get(info)}") from None
        if path.is_file():
            return path
    export(weights_path(info), path, info, float16=float16, with_probs=gpu)
    return path


def remove(info: ModelInfo) -> bool:
    """Delete the model's cache folder; False when there was nothing to delete."""
    directory = cache_dir() / info.name
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
