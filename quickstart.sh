#!/usr/bin/env bash
# The README's first command: set up, then run the whole pipeline on the embedded default
# (CPU, ONNX Runtime, the synthetic corpus): synthesize -> train -> export -> serve on :3000.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${DIMML_QUICKSTART_DIR:-quickstart}"
PORT="${DIMML_PORT:-3000}"

python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0           # CPU build; must come before the package
.venv/bin/pip install -q -e '.[train,export,serve,client,cpu]'
DIMML=.venv/bin/dimml

$DIMML synth --out "$OUT/data" --classes 4 --per-class 48 --seed 0
$DIMML train --data "$OUT/data" --method dimml --preset tiny --out "$OUT/run"
$DIMML export --run "$OUT/run" --out "$OUT/bundle"
$DIMML verify "$OUT/bundle" --data "$OUT/data"
echo "serving $OUT/bundle on http://localhost:$PORT  (Ctrl-C stops)"
exec $DIMML serve "$OUT/bundle" --port "$PORT"
