#!/usr/bin/env bash
# The README's first command: set up, then run the whole pipeline on the embedded default
# (CPU, ONNX Runtime, the synthetic corpus): synthesize -> train -> export -> serve on :3000.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${DIMML_QUICKSTART_DIR:-quickstart}"
PORT="${DIMML_PORT:-3000}"

python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0           # CPU build; must come before the package
.venv/bin/pip install -q -e .
PY=.venv/bin/python

$PY -m training synth --out "$OUT/data" --classes 4 --per-class 48 --seed 0
$PY -m training fit --data "$OUT/data" --method dimml --preset tiny --out "$OUT/run"
$PY -m export bundle --run "$OUT/run" --out "$OUT/bundle"
$PY -m export verify "$OUT/bundle" --data "$OUT/data"
echo "serving $OUT/bundle on http://localhost:$PORT  (Ctrl-C stops)"
DIMML_BUNDLE="$OUT/bundle" exec .venv/bin/bentoml serve --port "$PORT"
