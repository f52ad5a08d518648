"""An onnxruntime session for the exported graph, on the device the user asked for and no other."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from deeplab_cli.errors import ModelError, RuntimeSetupError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass
class Session:
    """A loaded model. `provider` is the execution provider that actually runs it."""

    ort_session: object
    provider: str
    classes: list[str]
    model_name: str
    device_id: int = 0
    pooling: str = "ceil"  # the graph's metadata: "floor" for a PyTorch port's network

    def run(self, images: np.ndarray, pad_to: tuple[int, int] | None = None,
            outputs: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8 BGR -> the named outputs: `logits` (N, C, h, w) float32 at stride 8, and with a
        graph exported `with_probs`, `probs` (N, C, H, W) float32 and `labels` (N, H, W) uint8."""
        feeds = {"image": images}
        if (pad := self.padding(images.shape[1:3], pad_to)) is not None:
            feeds["pad_to"] = np.asarray(pad, np.int64)
        return dict(zip(outputs, self.ort_session.run(list(outputs), feeds)))

    def padding(self, size: tuple[int, int], pad_to: tuple[int, int] | None) -> tuple[int, int] | None:
        """What the graph pads (H, W) images to: `pad_to` as asked, and for a floor-pooling network further, to
        sizes 8k + 1, the only ones where its scores cover the image (`network.floor_input_size`)."""
        if self.pooling != "floor":
            return pad_to
        from deeplab_cli.model.network import floor_input_size

        height, width = size if pad_to is None else (max(size[0], pad_to[0]), max(size[1], pad_to[1]))
        return floor_input_size(height), floor_input_size(width)

    def run_keeping(self, images: np.ndarray, pad_to: tuple[int, int] | None, keep: str,
                    fetch: tuple[str, ...] = ()) -> tuple[object, dict[str, np.ndarray]]:
        """As `run`, but output `keep` stays where the session computed it, an OrtValue on its device, for
        a graph that reads it there (the CRF's); only the `fetch` outputs come back to the host."""
        binding = self.ort_session.io_binding()
        binding.bind_cpu_input("image", np.ascontiguousarray(images))
        if (pad := self.padding(images.shape[1:3], pad_to)) is not None:
            binding.bind_cpu_input("pad_to", np.asarray(pad, np.int64))
        binding.bind_output(keep, "cuda" if self.provider == CUDA else "cpu", self.device_id)
        for name in fetch:
            binding.bind_output(name, "cpu")
        self.ort_session.run_with_iobinding(binding)
        kept, *fetched = binding.get_outputs()
        return kept, {name: value.numpy() for name, value in zip(fetch, fetched)}

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.ort_session.get_outputs())


def parse_device(device: str) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, device id). Raises ValueError on anything else."""
    match = _DEVICE.match(device.strip().lower())
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return match[1], int(match[2] or 0)


def wants_cuda(device: str) -> bool:
    """Whether `device` will ask for the CUDA provider (for `auto`: whether onnxruntime offers it)."""
    kind, _ = parse_device(device)
    if kind != "auto":
        return kind == "cuda"
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return CUDA in ort.get_available_providers()


def installed_onnxruntime() -> list[str]:
    """Names and versions of the installed distributions that provide the `onnxruntime` module."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def preload_cuda_libraries(ort) -> str:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* packages (`onnxruntime-gpu[cuda,cudnn]`) before a
    CUDA session starts: the CUDA provider has no RPATH to them and would not find them on its own. Libraries
    installed system-wide are found either way. Returns what onnxruntime reported missing ("" when nothing
    was), since it prints that on stdout, which carries results here. onnxruntime < 1.21 has no preload."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        preload()
    return "; ".join(line.strip() for line in report.getvalue().splitlines() if line.startswith("Failed"))


def start_session(model: str | bytes, device: str = "auto", threads: int | None = None, spin: bool = True,
                  what: str = "the model"):
    """An onnxruntime InferenceSession of `model` (a path or the serialised graph) on `device`:
    (session, the provider that runs it, the CUDA device id). `what` names the model in errors."""
    kind, device_id = parse_device(device)
    packages = installed_onnxruntime()
    if len(packages) > 1:
        raise RuntimeSetupError(
            f"both {' and '.join(packages)} are installed and overwrite each other's files; fix with: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'deeplab-cli[gpu]' (or '[cpu]')"
        )
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeSetupError(
            f"onnxruntime is not installed ({e}); install it with: pip install 'deeplab-cli[cpu]' "
            "(or 'deeplab-cli[gpu]' for CUDA)"
        ) from None

    available = ort.get_available_providers()
    if kind == "cuda" and CUDA not in available:
        raise RuntimeSetupError(
            f"--device {device}: onnxruntime has no CUDA provider (installed: {', '.join(packages) or 'none'}; "
            f"providers: {', '.join(available)}); install the GPU build: "
            "pip uninstall -y onnxruntime && pip install 'deeplab-cli[gpu]'"
        )
    want_cuda = kind == "cuda" or (kind == "auto" and CUDA in available)
    providers: list = [CPU]
    preload_report = ""
    if want_cuda:
        preload_report = preload_cuda_libraries(ort)
        # Image sizes vary from call to call: an exhaustive cuDNN search would rerun for every new size.
        # No TF32: float32 means float32, as in Caffe; the fast GPU path is the float16 graph, by choice.
        providers = [(CUDA, {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC",
                             "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}), CPU]

    options = ort.SessionOptions()
    options.log_severity_level = 3  # pad_to is an overridable initializer; ORT warns about it on every load
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable or invalid models
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeSetupError(f"{what}: cannot load the model ({reason})") from None
    active = session.get_providers()[0]
    if kind == "cuda" and active != CUDA:
        # onnxruntime quietly drops CUDA when its libraries (CUDA, cuDNN) cannot be loaded.
        missing = f" ({preload_report})" if preload_report else ""
        raise RuntimeSetupError(
            f"--device {device}: the CUDA provider did not start (active: {', '.join(session.get_providers())})"
            f"{missing}; check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]') and that a GPU is visible (nvidia-smi)"
        )
    return session, active, device_id


def open_session(model_path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 spin: bool = True) -> Session:
    """Load `model_path` on `device`. `cuda` never falls back to the CPU: it fails with the reason.

    spin=False stops idle onnxruntime threads from busy-waiting, which would take cores from CRF workers.
    """
    session, active, device_id = start_session(os.fspath(model_path), device, threads, spin, os.fspath(model_path))
    meta = session.get_modelmeta().custom_metadata_map
    try:
        classes = json.loads(meta.get("classes", "[]"))
    except ValueError:
        raise ModelError(f"{model_path}: the model's 'classes' metadata is not JSON") from None
    return Session(session, active, classes, meta.get("model_name", os.fspath(model_path)), device_id,
                   meta.get("pooling", "ceil"))
