#!/usr/bin/env bash
# Render `vtadl report RUNS_DIR` and photograph it with headless Chromium, to look at the page
# as a reader will. Chromium: `apt-get install -y chromium` (Debian).
#
#   benchmarks/report_screenshot.sh RUNS_DIR [OUT.png] [WIDTH] [HEIGHT]
set -euo pipefail

runs=${1:?usage: $0 RUNS_DIR [OUT.png] [WIDTH] [HEIGHT]}
png=${2:-report.png}
width=${3:-1280}
height=${4:-4000}
here=$(cd "$(dirname "$0")/.." && pwd)
vtadl=${VTADL:-$here/.venv/bin/vtadl}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) || {
    echo "no Chromium found: apt-get install -y chromium" >&2
    exit 2
}

html=$(mktemp --suffix=.html)
profile=$(mktemp -d)
trap 'rm -rf "$html" "$profile"' EXIT
"$vtadl" report "$runs" --out "$html"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$(realpath -m "$png")" "file://$html" 2>/dev/null
echo "screenshot: $png"
