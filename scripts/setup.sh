#!/usr/bin/env bash
# Set up everything pdmesh needs on a fresh machine: system libraries, a virtualenv, PyTorch, the project with its
# test extras, and the Mooncake Transfer Engine build that matches the machine. Safe to re-run.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { echo "[setup] $*"; }

# Mooncake links against the RDMA verbs library even when it only uses TCP.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1 '; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing Debian's libibverbs1 (needed by Mooncake)"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq libibverbs1 >/dev/null
  else
    say "warning: libibverbs.so.1 not found and no apt-get; install your distribution's libibverbs package"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  site=""
  # A machine whose Python already has torch (say a CUDA build) keeps it: the virtualenv sees it.
  if "$PYTHON" -c "import torch" 2>/dev/null; then site="--system-site-packages"; fi
  say "creating $VENV ${site:+(seeing the system torch)}"
  "$PYTHON" -m venv $site "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0"
  "${pip[@]}" torch==2.13.0
fi
say "installing pdmesh with its worker and test extras"
"${pip[@]}" -e ".[worker,test]"

cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
case "$cuda" in
  12*) mooncake=mooncake-transfer-engine ;;
  13*) mooncake=mooncake-transfer-engine-cuda13 ;;
  *) mooncake=mooncake-transfer-engine-non-cuda ;;
esac
if ! "$VENV/bin/python" -c "import mooncake.engine" 2>/dev/null; then
  say "installing $mooncake"
  "${pip[@]}" "$mooncake"
fi
say "ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), $mooncake)"
