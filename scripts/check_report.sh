#!/usr/bin/env bash
# Render an ipshield HTML report in a real headless browser (Debian's chromium) and check it:
#   1. a screenshot is taken (default window 1280x2000; WINDOW=1280,6000 for more of the page)
#      and is not blank;
#   2. every embedded plot decodes in the browser: a copy of the report with a one-line script
#      appended is loaded with --dump-dom, the script writes how many <img> elements have a
#      natural width, and all of them must.
#
# usage: scripts/check_report.sh REPORT.html [SCREENSHOT.png]
# exit status: 0 ok, 1 a check failed, 3 no chromium found (install: apt-get install -y chromium)
set -euo pipefail

report=${1:?usage: scripts/check_report.sh REPORT.html [SCREENSHOT.png]}
shot=${2:-${report%.html}.png}
window=${WINDOW:-1280,2000}
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py=python3; fi
fi

browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser=$(command -v "$b"); break; fi
  done
fi
if [[ -z "$browser" ]]; then
  echo "no chromium found (apt-get install -y chromium, or set CHROMIUM=/path/to/browser)" >&2
  exit 3
fi
[[ -f "$report" ]] || { echo "no such report: $report" >&2; exit 1; }

abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
profile=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$profile" "$work"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --disable-dev-shm-usage --hide-scrollbars
       --user-data-dir="$profile")

# 1. screenshot
timeout 180 "$browser" "${flags[@]}" --screenshot="$shot" --window-size="$window" "file://$abs" >"$work/shot.log" 2>&1 || {
  echo "chromium failed to take the screenshot:" >&2; tail -20 "$work/shot.log" >&2; exit 1; }
[[ -s "$shot" ]] || { echo "chromium wrote no screenshot" >&2; tail -20 "$work/shot.log" >&2; exit 1; }

# 2. every image decodes (the report itself has no script; the probe is added to a copy)
probe="$work/probe.html"
cp "$abs" "$probe"
cat >>"$probe" <<'EOF'
<script>window.addEventListener("load",function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
var p=document.createElement("p");p.id="ipshield-probe";p.textContent="IMAGES "+ok+"/"+im.length+" EXTERNAL "+
performance.getEntriesByType("resource").filter(function(r){return !r.name.startsWith("data:")&&!r.name.startsWith("file:");}).length;
document.body.appendChild(p);});</script>
EOF
rm -rf "$profile"; profile=$(mktemp -d)
timeout 180 "$browser" "${flags[@]}" --user-data-dir="$profile" --virtual-time-budget=10000 --dump-dom "file://$probe" \
  >"$work/dom.html" 2>"$work/dom.log" || { echo "chromium failed to load the report:" >&2; tail -20 "$work/dom.log" >&2; exit 1; }
line=$(grep -o 'IMAGES [0-9]*/[0-9]* EXTERNAL [0-9]*' "$work/dom.html" || true)
[[ -n "$line" ]] || { echo "the probe did not run (page did not finish loading)" >&2; exit 1; }
read -r _ counts _ external <<<"$line"
ok=${counts%/*}; total=${counts#*/}

# 3. the screenshot is not blank
stats=$("$py" - "$shot" <<'EOF'
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB")
small = im.resize((max(1, im.width // 4), max(1, im.height // 4)))
counts = small.getcolors(maxcolors=small.width * small.height)
n = small.width * small.height
nonwhite = sum(c for c, p in counts if min(p) < 235) / n
colours = len(counts)
print(f"{im.width}x{im.height} nonwhite={nonwhite:.3f} colours={colours}")
sys.exit(0 if nonwhite > 0.02 and colours > 50 else 1)
EOF
) || { echo "the screenshot looks blank: $stats" >&2; exit 1; }

echo "browser: $("$browser" --version 2>/dev/null | head -1)"
echo "screenshot: $shot ($stats)"
echo "images decoded in the browser: $ok/$total; external requests: $external"
if [[ "$total" -eq 0 || "$ok" -ne "$total" || "$external" -ne 0 ]]; then
  echo "FAILED: every embedded image must decode and nothing external may load" >&2
  exit 1
fi
echo "OK"
