#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what `python -m miotts_stream.bench.gpu` needs on a GPU
# machine that has Python 3.12 and torch with CUDA but neither network access nor these
# packages: the gRPC runtime, protobuf, soxr and opuslib at the versions of locks/cuda.txt, as
# wheels for CPython 3.12 on manylinux x86-64, and this machine's libopus.so.0 (opuslib loads
# it). On the GPU machine (README, "Ready for the GPU"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. LD_LIBRARY_PATH=.whl python3 -m miotts_stream.bench.gpu --out gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for name in grpcio protobuf grpcio-health-checking grpcio-reflection soxr; do
  pin=$(grep -i -E "^$name==" locks/cuda.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pin"
done
# opuslib is pure Python and published as a source archive only: build its wheel here.
python3 -m pip wheel -q --no-deps -w .whl "$(grep -i -E '^opuslib==' locks/cuda.txt)"
libopus=$(ldconfig -p | awk '/libopus\.so\.0 .*x86-64/ {print $NF; exit}')
cp -L "$libopus" .whl/libopus.so.0
cp -L "$libopus" .whl/libopus.so  # the name ctypes.util.find_library looks for on LD_LIBRARY_PATH
ls -1 .whl
du -sh .whl
