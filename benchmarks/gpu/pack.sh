#!/usr/bin/env bash
# Here, on a machine that reaches PyPI: pack what a lent GPU machine lacks (onnxruntime-gpu, numba and
# llvmlite for deeplab's CRF engine, pydensecrf's sdist and the Cython it builds with, platformdirs) into
# .gpukit/1 ... .gpukit/N, one folder per device call, each well under the 64 MiB a call may carry. benchmarks/gpu/README.md says how to use them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}  # built for CUDA 13, as the lent machines' libraries are
PY=${PY:-3.12}                               # the lent machines' Python
PIECE_MIB=${PIECE_MIB:-55}

kit=.gpukit
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download() { python3 -m pip download -q --no-deps -d "$tmp/dl" "$@"; }
download --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$ORT_GPU"
download --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "numba==${NUMBA:-0.68.1}" "llvmlite==${LLVMLITE:-0.50.0}"
download --only-binary=:all: --python-version "$PY" --implementation py --abi none --platform any \
  cython==0.29.36 platformdirs
download --no-binary=:all: pydensecrf2==1.1

# The wheel's deflate leaves the CUDA kernels at ~250 MB; its files in xz come to ~210 MB, a call fewer.
# llvmlite's wheel (60 MB) travels in the same stream: ort/ holds onnxruntime's files, wheels/ the two wheels.
mkdir -p "$tmp/kit/wheels"
python3 -m zipfile -e "$tmp"/dl/onnxruntime_gpu-*.whl "$tmp/kit/ort"
mv "$tmp"/dl/numba-*.whl "$tmp"/dl/llvmlite-*.whl "$tmp/kit/wheels/"
tar -C "$tmp/kit" -cf - . | xz -6 -T0 > "$tmp/ort.tar.xz"
(cd "$tmp" && sha256sum ort.tar.xz > ort.tar.xz.sha256)
split -b "${PIECE_MIB}M" -d -a 1 "$tmp/ort.tar.xz" "$tmp/ort.tar.xz.part"

rm -rf "$kit"
mkdir -p "$kit/1"
mv "$tmp"/dl/[Cc]ython-*.whl "$tmp"/dl/platformdirs-*.whl "$tmp"/dl/pydensecrf2-*.tar.gz "$tmp/ort.tar.xz.sha256" "$kit/1/"
calls=0
for part in "$tmp"/ort.tar.xz.part*; do
  calls=$((calls + 1))
  mkdir -p "$kit/$calls"
  mv "$part" "$kit/$calls/"
done
du -sh "$kit"/*
echo "kit ready: $calls device calls, back to back (a machine stays warm ~30 s after each):"
for i in $(seq 1 "$calls"); do
  verb=receive
  [ "$i" = "$calls" ] && verb="run   # timeout_s 540"
  echo "  carry [\"$kit/$i\"]  command: bash benchmarks/gpu/device.sh $verb"
done
