#!/usr/bin/env bash
# On the lent GPU machine, in the repository's copy there. `receive`: keep the kit pieces this call
# carried (.gpukit/*) in /root/gpukit, and say what the machine has. `run` (the last call): the same,
# then install onnxruntime-gpu, numba and pydensecrf from the kit, run the CUDA tests and the benchmark's GPU
# rows, and leave the logs, the measurements (JSON) and their markdown in $OUT. benchmarks/gpu/README.md
# has the whole sequence.
set -uo pipefail
cd "$(dirname "$0")/../.."
store=/root/gpukit
out=${OUT:-/tmp/gpukit-out}
mkdir -p "$store" "$out"
for folder in .gpukit/*/; do
  [ -d "$folder" ] && cp "$folder"* "$store"/
done
ls -l "$store"
if [ "${1:-}" != run ]; then
  nvidia-smi -L
  python3 -V
  command -v g++ || echo "no g++: pydensecrf cannot be built here"
  python3 -m pip list 2>/dev/null | grep -iE "^(onnxruntime|cython|numpy|numba|llvmlite|setuptools|opencv|pytest|torch) "
  exit 0
fi

set -e
# onnxruntime-gpu in place of the CPU build (both installed would be refused by deeplab, rightly).
cat "$store"/ort.tar.xz.part* > /tmp/ort.tar.xz
(cd /tmp && sha256sum -c "$store/ort.tar.xz.sha256")
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m pip uninstall -y -q onnxruntime onnxruntime-gpu 2>/dev/null || true
rm -rf /tmp/kit
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' /tmp/ort.tar.xz /tmp/kit
cp -a /tmp/kit/ort/. "$site"/
python3 -m pip install -q --no-index --no-deps "$store"/platformdirs-*.whl /tmp/kit/wheels/*.whl
# pydensecrf2's setup.py asks for exactly Cython 0.29.36, which no registry can bring here.
python3 -m pip install -q --no-index --no-deps --target /tmp/cython "$store"/[Cc]ython-*.whl
PYTHONPATH=/tmp/cython python3 -m pip install -q --no-index --no-deps --no-build-isolation "$store"/pydensecrf2-*.tar.gz

export PYTHONPATH=src PYTHONUNBUFFERED=1
probe() {  # deeplab's own session on CUDA, for a one-node graph: does the provider start?
  python3 - <<'PY'
import onnx
from onnx import TensorProto, helper
from deeplab_cli.model.runtime import open_session
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "xy"]
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", io[:1], io[1:])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "/tmp/probe.onnx")
print("deeplab's CUDA session runs on", open_session("/tmp/probe.onnx", "cuda").provider)
PY
}
if ! probe; then
  # Say where the pip CUDA libraries are, then try them on the loader's path, so the numbers still come.
  find "$site/nvidia" -name 'libcudnn.so.*' -o -name 'libcublasLt.so.*' -o -name 'libcudart.so.*' | head
  LD_LIBRARY_PATH=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | paste -sd:)
  export LD_LIBRARY_PATH
  echo "retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  probe
fi
set +e
python3 -m pytest -q -rs -p no:cacheprovider tests -k cuda 2>&1 | tee "$out/cuda-tests.log"
python3 benchmarks/run.py --gpu-only --rounds 2 --json "$out/benchmark-gpu.json" 2>&1 | tee "$out/benchmark.log"
# The run-gpu section with its markers, for BENCHMARKS.md (benchmarks/render.py puts the JSON there).
python3 benchmarks/render.py "$out/benchmark-gpu.json" > "$out/BENCHMARKS-gpu.md"
