from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner

from deeplab_cli.synthetic import natural_image, random_weights
from reference import training_net

# BVLC Caffe's LeNet example as Caffe wrote it (BSD-2-Clause; origin and notice in tests/data/caffe/README.md).
CAFFE_DATA = Path(__file__).resolve().parent / "data" / "caffe"
LENET = CAFFE_DATA / "lenet_iter_10000.caffemodel"


# The CUDA path's own tests run where onnxruntime-gpu and a GPU are (benchmarks/gpu/README.md).
CUDA_OFFERED = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
needs_cuda = pytest.mark.skipif(not CUDA_OFFERED, reason="onnxruntime offers no CUDA provider here")


def pytest_configure(config):
    # Before any test module imports a kernel module: numba caches compiled kernels where the CLI does.
    from deeplab_cli import jit

    jit.configure_numba()


@pytest.fixture(scope="session")
def weights():
    """Random LargeFOV weights of the real shapes, OIHW float32."""
    return random_weights(seed=0)


@pytest.fixture(scope="session")
def onnx_model(weights, tmp_path_factory):
    """The full-size graph exported from `weights`, as a file."""
    import onnx

    from deeplab_cli.model.network import build_onnx, check_weights
    from deeplab_cli.io.outputs import VOC_CLASSES

    path = tmp_path_factory.mktemp("model") / "model.onnx"
    model = build_onnx(check_weights(weights, "test"), classes=list(VOC_CLASSES),
                       model_name="test", source_sha256="0" * 64)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def port_model(weights, tmp_path_factory):
    """`onnx_model` as the PyTorch port computes it: the same weights, poolings rounding down."""
    import onnx

    from deeplab_cli.model.network import build_onnx, check_weights
    from deeplab_cli.io.outputs import VOC_CLASSES

    path = tmp_path_factory.mktemp("model") / "port.onnx"
    onnx.save(build_onnx(check_weights(weights, "test"), classes=list(VOC_CLASSES), model_name="port",
                         source_sha256="0" * 64, pooling="floor"), path)
    return path


@pytest.fixture(scope="session")
def probs_model(weights, tmp_path_factory):
    """The graph for GPUs: `onnx_model` plus `probs` and `labels` outputs at the working size."""
    import onnx

    from deeplab_cli.model.network import build_onnx, check_weights
    from deeplab_cli.io.outputs import VOC_CLASSES

    path = tmp_path_factory.mktemp("model") / "model.gpu.onnx"
    onnx.save(build_onnx(check_weights(weights, "test"), classes=list(VOC_CLASSES), model_name="test",
                         source_sha256="0" * 64, with_probs=True), path)
    return path


@pytest.fixture(scope="session")
def largefov_caffemodel(weights, tmp_path_factory):
    """`weights` as a real DeepLab v1 training snapshot (.caffemodel, old layout), ~82 MB."""
    from caffe_writer import write_caffemodel

    path = tmp_path_factory.mktemp("weights") / "train2_iter_8000.caffemodel"
    write_caffemodel(path, training_net(weights), "v1")
    return path


@pytest.fixture(scope="session")
def quantized_home(largefov_caffemodel, tmp_path_factory):
    """(a folder with `home`, a DEEPLAB_HOME holding the default model and its int8 graph, and `photos`, 5
    small images the graph was calibrated on 3 of; what `deeplab models quantize` printed)."""
    import cv2

    from deeplab_cli.model import registry

    root = tmp_path_factory.mktemp("int8")
    photos = root / "photos"
    photos.mkdir()
    for i in range(5):
        cv2.imwrite(str(photos / f"{i}.png"), natural_image(40 + 8 * i, 56, seed=50 + i))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPLAB_HOME", str(root / "home"))
        patch.delenv("DEEPLAB_OFFLINE", raising=False)
        registry.import_file(registry.get_model(registry.DEFAULT_MODEL), largefov_caffemodel)
        result = run_cli("models", "quantize", "--calibrate", photos, "--count", "3")
    return root, result


@pytest.fixture
def deeplab_home(tmp_path, monkeypatch):
    """An empty DEEPLAB_HOME, with no mirror or offline setting leaking in from the caller's shell."""
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DEEPLAB_MIRROR", raising=False)
    monkeypatch.delenv("DEEPLAB_OFFLINE", raising=False)
    return tmp_path / "home"


def files_in(directory):
    """Everything in `directory`, hidden temporaries included; [] when it does not exist."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def children_of(pid):
    """The processes whose parent is `pid` (a run's workers)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def run_cli(*args):
    from deeplab_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, exit_code, *phrases):
    """`exit_code` with one line on stderr that contains every phrase, and no traceback."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0]


GOOD_IMAGES = ["cats/a.jpg", "dogs/a.jpg", "gray.png", "rgba.png", "deep16.png", "rotated.jpg",
               "sub/deeper/b.png", "palette.png"]
BAD_IMAGES = ["corrupt.jpg", "empty.png", "notes.png"]


@pytest.fixture
def photo_folder(tmp_path):
    """A folder as users have them: nested, a name used twice, odd formats, and broken files."""
    return write_photo_folder(tmp_path / "img")


def write_photo_folder(root):
    """`photo_folder`'s files under `root` (tests/golden/make_golden.py labels them too)."""
    import cv2
    from PIL import Image

    for sub in ("cats", "dogs", "sub/deeper"):
        (root / sub).mkdir(parents=True)
    cv2.imwrite(str(root / "cats/a.jpg"), natural_image(45, 61, seed=1))
    cv2.imwrite(str(root / "dogs/a.jpg"), natural_image(37, 45, seed=2))
    cv2.imwrite(str(root / "gray.png"), natural_image(33, 40, seed=3)[..., 0])
    rgba = np.dstack([natural_image(41, 29, seed=4), np.full((41, 29), 128, np.uint8)])
    cv2.imwrite(str(root / "rgba.png"), rgba)
    cv2.imwrite(str(root / "deep16.png"), natural_image(30, 35, seed=5).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(natural_image(40, 30, seed=6)[..., ::-1]).save(root / "rotated.jpg", exif=exif)
    cv2.imwrite(str(root / "sub/deeper/b.png"), natural_image(50, 38, seed=7))
    Image.fromarray(natural_image(36, 44, seed=8)[..., 0] // 32).convert("P").save(root / "palette.png")
    good = (root / "cats/a.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image\n")
    return root


# The pipeline's, the lanes' and the stages' tests share these.
@pytest.fixture(scope="module")
def session(onnx_model):
    from deeplab_cli.model.runtime import open_session

    return open_session(onnx_model, "cpu", spin=False)


@pytest.fixture
def folder(tmp_path):
    import cv2

    root = tmp_path / "img"
    root.mkdir()
    for i, size in enumerate([(40, 52), (40, 52), (33, 47), (40, 52), (61, 30)]):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(*size, seed=40 + i))
    (root / "5.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def probs_session(probs_model):
    from deeplab_cli.model.runtime import open_session

    return open_session(probs_model, "cpu")
