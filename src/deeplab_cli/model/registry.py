"""The models the project knows (`models/*.toml`), the local cache of their weights and graphs, and
the conversion of weights to those graphs (`export`).

Cache layout: `$DEEPLAB_HOME/<name>/<source file>` (the weights, kept for re-conversion: the published
file name for a download, the file's own name for an import), `source.json` (that file's name, SHA-256,
the URL it came from or the path it was imported from, and the date) and `model.onnx`, with
`model.gpu.onnx` / `model.gpu.fp16.onnx` (the graph with the upsampling and softmax inside, in
float32 / float16) converted from the weights on first use, and `model.int8.onnx`, which
`deeplab models quantize` calibrates on the user's images. DEEPLAB_HOME defaults to
the user cache directory; point it at a shared filesystem to pull once for a whole cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from deeplab_cli.errors import DownloadError, ModelError, WeightsError
from deeplab_cli.home import cache_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "largefov-voc12"  # the authors' weights: the paper's model, computed as they computed it
FALLBACK_MODEL = "largefov-voc12-pytorch"  # VOC weights on a host that answers, for when theirs cannot be had
ENV_MIRROR, ENV_OFFLINE = "DEEPLAB_MIRROR", "DEEPLAB_OFFLINE"


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
    archive: str | None = None  # prefix that turns a published URL into its Internet Archive copy
    git_blob_sha1: str | None = None  # the weights' git blob id, where a git repository hosts them
    pooling: str = "ceil"  # how the network's poolings round: Caffe's "ceil", or PyTorch's "floor"


@dataclass(frozen=True)
class SourceRecord:
    """What `source.json` says about the weights kept in a model's cache folder."""

    file: str  # their name in that folder
    sha256: str
    source: str  # the URL they came from, or "imported from <path>"
    date: str  # when they were recorded, ISO 8601 UTC


def _models_dir() -> Path:
    # A wheel carries models/ inside the package; a source checkout has it at the repository root.
    package = Path(__file__).resolve().parents[1]
    packaged = package / "models"
    return packaged if packaged.is_dir() else package.parents[1] / "models"


def known_models() -> dict[str, ModelInfo]:
    models = {}
    for path in sorted(_models_dir().glob("*.toml"), key=lambda p: (p.stem != DEFAULT_MODEL, p.name)):  # default first
        data = tomllib.loads(path.read_text())
        models[data["name"]] = ModelInfo(
            name=data["name"], description=data.get("description", ""), file=data["file"],
            urls=tuple(data.get("urls", ())), sha256=data.get("sha256") or None,
            classes=tuple(data["classes"]), mean_bgr=tuple(data["mean_bgr"]), fc8=data["fc8"],
            crf=dict(data.get("crf", {})), archive=data.get("archive") or None,
            git_blob_sha1=data.get("git_blob_sha1") or None, pooling=data.get("pooling", "ceil"),
        )
    return models


def get_model(name: str) -> ModelInfo:
    models = known_models()
    if name not in models:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(models) or 'none'})")
    return models[name]


def offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("", "0", "false", "no")


def weights_path(info: ModelInfo) -> Path:
    return cache_dir() / info.name / info.file


def onnx_path(info: ModelInfo, float16: bool = False, gpu: bool = False) -> Path:
    return cache_dir() / info.name / ("model" + ".gpu" * gpu + ".fp16" * float16 + ".onnx")


def int8_path(info: ModelInfo) -> Path:
    return cache_dir() / info.name / "model.int8.onnx"


def quantized(info: ModelInfo) -> Path:
    """The cached int8 graph (`deeplab models quantize`); ModelError saying how to make it when missing."""
    path = int8_path(info)
    if not path.is_file():
        raise ModelError(f"{info.name} has no int8 graph in the cache ({cache_dir()}); run `deeplab models quantize "
                         f"{info.name} --calibrate DIR` on a folder of images like yours first")
    return path


def source_path(info: ModelInfo) -> Path:
    return cache_dir() / info.name / "source.json"


def download_urls(info: ModelInfo) -> list[str]:
    """Where `pull` looks, in order: the published URLs, then the Internet Archive's copies of them; or only
    the mirror's when DEEPLAB_MIRROR names one (nodes that see no internet)."""
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if mirror:
        return [f"{mirror.rstrip('/')}/{info.file}"]
    return [*info.urls, *(info.archive + url for url in info.urls if info.archive)]


def how_to_get(info: ModelInfo) -> str:
    if not info.urls:
        return f"run `deeplab models import FILE --name {info.name}`"
    # The published servers are reported dead since 2017: point at the copy most likely to answer.
    url = info.archive + info.urls[0] if info.archive else info.urls[0]
    return (f"run `deeplab models pull {info.name}`, or download {info.file} from {url} "
            f"and run `deeplab models import {info.file} --name {info.name}`")


def read_source(info: ModelInfo) -> SourceRecord | None:
    """The recorded source of the cached weights; None when there is none (nothing cached, a cache written
    before sources were recorded) or it cannot be read."""
    try:
        data = json.loads(source_path(info).read_text())
        record = SourceRecord(file=data["file"], sha256=data["sha256"], source=data["source"], date=data["date"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A plain file name, nothing else: the cache opens and deletes what the record names (on a shared disk).
    plain = isinstance(record.file, str) and record.file not in ("", "..") and Path(record.file).name == record.file
    return record if plain else None


def cached_weights(info: ModelInfo) -> Path | None:
    """The cached weights: the file source.json names, or the published file name in a cache written
    before sources were recorded. None when there are none."""
    record = read_source(info)
    path = cache_dir() / info.name / (record.file if record else info.file)
    return path if path.is_file() else None


def verified(info: ModelInfo) -> SourceRecord | None:
    """The recorded source when the cache is complete: the ONNX graph, the record, the weights it names,
    and the registry's SHA-256 (when it has one) matching the record. The weights are not hashed again:
    the record is written only after they were checked, converted and renamed into place."""
    record = read_source(info)
    if record is None or not onnx_path(info).is_file() or not (cache_dir() / info.name / record.file).is_file():
        return None
    if info.sha256 and record.sha256 != info.sha256.lower():
        return None
    return record


def state(info: ModelInfo) -> str:
    """What the cache holds of a model: cached, unverified, weights only or not cached."""
    if verified(info):
        return "cached"
    if onnx_path(info).is_file():
        # A graph without a record of its weights, or weights that do
        # not match the registry's sha256: `pull` fetches these again.
        return "unverified"
    if cached_weights(info):
        return "weights only"  # the graph is converted from them on first use
    return "not cached"


def cached_onnx(info: ModelInfo) -> Path:
    """The cached ONNX file of a model; ModelError saying how to get it when it is not cached."""
    path = onnx_path(info)
    if not path.is_file():
        raise ModelError(f"{info.name} is not in the cache ({cache_dir()}); {how_to_get(info)}")
    return path


def _record(info: ModelInfo, kept: Path, sha256: str, source: str) -> None:
    """Record `kept` as the model's weights, and drop what earlier weights left: their file under another
    name, and graphs converted from them (ensure() converts new ones when asked). `model.onnx` was just
    converted from `kept` and stays."""
    from deeplab_cli.io.outputs import atomic_write

    previous = read_source(info)
    record = SourceRecord(kept.name, sha256, source, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write(source_path(info), lambda tmp: tmp.write_text(json.dumps(asdict(record), indent=2) + "\n"))
    earlier = kept.with_name(previous.file if previous else info.file)
    if earlier != kept:
        earlier.unlink(missing_ok=True)
    if previous is None or previous.sha256 != sha256:
        for graph in kept.parent.glob("model.*.onnx"):
            graph.unlink(missing_ok=True)


def pull(info: ModelInfo, progress=None) -> Path:
    """Download the weights (see `download_urls`), verify, convert, and cache and record both, whatever is
    cached already. Returns the ONNX path."""
    from deeplab_cli.model.download import fetch

    if offline():
        raise ModelError(f"{info.name}: not downloading, {ENV_OFFLINE} is set; {how_to_get(info)} on a machine "
                         "with internet access")

    def unusable(tmp: Path) -> str | None:
        # Converting is the check: only DeepLab-LargeFOV with every layer of the right shape converts.
        # Refused, the next URL is tried (an archive or a mirror may serve another file under this name).
        try:
            export(tmp, onnx_path(info), info)
        except WeightsError as e:
            return "not usable: " + str(e).removeprefix(f"{tmp}: ")  # the temporary file is about to go
        return None

    try:
        with fetch(download_urls(info), weights_path(info).parent, sha256=info.sha256,
                   git_blob_sha1=info.git_blob_sha1, check=unusable, progress=progress) as fetched:
            os.replace(fetched.path, weights_path(info))
    except DownloadError as e:
        raise DownloadError(f"{e}; if you can get {info.file} (or an .npz of its arrays) some other way, run "
                            f"`deeplab models import FILE --name {info.name}`") from None
    _record(info, weights_path(info), fetched.sha256, fetched.url)
    return onnx_path(info)


def import_file(info: ModelInfo, source: Path) -> tuple[Path, str]:
    """Convert a local weight file into the cache under `info.name`, keep it there under its own name (an
    .npz stays an .npz) and record it. Returns (ONNX path, SHA-256)."""
    from deeplab_cli.io.outputs import atomic_write
    from deeplab_cli.model.download import git_blob_id
    from deeplab_cli.model.weights import sha256_file

    kept = cache_dir() / info.name / source.name
    if source.name == source_path(info).name or source.suffix == ".onnx":
        raise ModelError(f"{source}: rename it first, the cache keeps files of its own under that name")
    digest = sha256_file(source)
    if info.sha256 and digest != info.sha256.lower():
        raise ModelError(f"{source}: SHA-256 {digest} does not match {info.name}'s {info.sha256}")
    if info.git_blob_sha1 and (blob := git_blob_id(source)) != info.git_blob_sha1.lower():
        raise ModelError(f"{source}: git blob id {blob} does not match {info.name}'s {info.git_blob_sha1}")
    export(source, onnx_path(info), info)
    if source.resolve() != kept.resolve():
        atomic_write(kept, lambda tmp: shutil.copyfile(source, tmp))
    _record(info, kept, digest, f"imported from {source.resolve()}")
    return onnx_path(info), digest


def ensure(info: ModelInfo, float16: bool = False, gpu: bool = False, progress=None) -> Path:
    """The cached ONNX graph, pulled (unless offline) or converted from cached weights when missing."""

    path = onnx_path(info, float16, gpu)
    if path.is_file():
        return path
    weights = cached_weights(info)
    if weights is None:
        if offline():
            raise ModelError(f"{info.name} is not in the cache ({cache_dir()}) and {ENV_OFFLINE} is set; "
                             f"{how_to_get(info)}")
        try:
            pull(info, progress)
        except ModelError as e:  # its message lists every URL tried and says how to import a file instead
            raise ModelError(f"{info.name} is not in the cache ({cache_dir()}) and could not be fetched: {e}") from None
        if path.is_file():
            return path
        weights = cached_weights(info)
    export(weights, path, info, float16=float16, with_probs=gpu)
    return path


def ensure_default(float16: bool = False, gpu: bool = False, progress=None) -> tuple[ModelInfo, Path, str | None]:
    """The model to use when none is named: (its info, its graph as `ensure` gives it, a line for the user
    when it is not DEFAULT_MODEL).

    The authors' weights when cached or fetched; else the fallback's. A cached fallback is used without
    trying the authors' hosts again, so a batch job does not wait on dead servers at every start."""
    authors, port = get_model(DEFAULT_MODEL), get_model(FALLBACK_MODEL)
    if not _has_weights(authors) and _has_weights(port):
        return port, ensure(port, float16, gpu, progress), (
            f"using {port.name}: {authors.name} is not in the cache ({cache_dir()}) and {port.name} is; "
            f"`deeplab models pull {authors.name}` fetches the authors' weights, -m chooses a model")
    try:
        return authors, ensure(authors, float16, gpu, progress), None
    except ModelError as e:
        failure = e
    try:
        path = ensure(port, float16, gpu, progress)
    except ModelError as e:
        raise ModelError(f"{failure}; the fallback {port.name} could not be had either: {e}") from None
    return port, path, (f"using {port.name}: {authors.name} could not be fetched (`deeplab models pull "
                        f"{authors.name}` says why); -m chooses a model")


def default_quantized() -> tuple[ModelInfo, str | None]:
    """The model whose int8 graph runs when none is named: the authors' when it has one, else the
    fallback's when that has one (with a line for the user), else the authors' (`quantized` then says
    how to make it)."""
    authors, port = get_model(DEFAULT_MODEL), get_model(FALLBACK_MODEL)
    if not int8_path(authors).is_file() and int8_path(port).is_file():
        return port, f"using {port.name}: it has an int8 graph and {authors.name} has none; -m chooses a model"
    return authors, None


def model_for_file(source: str | os.PathLike) -> ModelInfo:
    """The registry model a weight file belongs to when the user names none: a PyTorch state_dict is the
    port's, anything else the authors'."""
    from deeplab_cli.model.weights import weights_format

    return get_model(FALLBACK_MODEL if weights_format(source) == "pth" else DEFAULT_MODEL)


def _has_weights(info: ModelInfo) -> bool:
    return onnx_path(info).is_file() or cached_weights(info) is not None


def remove(info: ModelInfo) -> bool:
    """Delete the model's cache folder; False when there was nothing to delete."""
    directory = cache_dir() / info.name
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True


def export(source: str | os.PathLike, out: str | os.PathLike, info: ModelInfo, *, float16: bool = False,
           with_probs: bool = False) -> str:
    """Convert a .caffemodel, .pth or .npz to the ONNX graph at `out`; return the source's SHA-256.

    Raises WeightsError when `source` is unreadable or not DeepLab-LargeFOV; `out` is then untouched.
    """
    import onnx

    from deeplab_cli.io.outputs import atomic_write
    from deeplab_cli.model.network import build_onnx, check_weights
    from deeplab_cli.model.weights import load_weights

    weights = load_weights(source)
    checked = check_weights(weights.arrays, os.fspath(source), weights.dilations,
                            num_classes=len(info.classes), fc8=info.fc8)
    model = build_onnx(checked, classes=list(info.classes), model_name=info.name, source_sha256=weights.sha256,
                       mean_bgr=info.mean_bgr, fc8=info.fc8, pooling=info.pooling, float16=float16,
                       with_probs=with_probs)
    atomic_write(Path(out), lambda tmp: onnx.save(model, os.fspath(tmp)))
    return weights.sha256
