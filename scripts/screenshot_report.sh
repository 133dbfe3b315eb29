#!/usr/bin/env bash
# The README's screenshot: the top of a report.html in headless Chromium, shrunk to a small palette PNG.
#   scripts/screenshot_report.sh reports/demo/report.html docs/img/report.png
set -euo pipefail
page=$(realpath "$1"); out=$2
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
  --window-size=1200,1250 --screenshot="$work/raw.png" "file://$page" >/dev/null 2>&1
"$python" - "$work/raw.png" "$out" <<'PY'
import sys
from PIL import Image  # matplotlib's dependency
image = Image.open(sys.argv[1]).convert("RGB")
image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
PY
ls -l "$out"
