#!/usr/bin/env bash
# Run by the prepared GPU check (every executable benchmarks/gpu_*.sh): the video caches on a
# full-width Wan 2.1 1.3B transformer at the real frame count (benchmarks/gpu_wan.py).
# --budget-s: no setting starts after that many seconds, so the table of what was measured prints
# inside the check's time (about 500 s for all scripts and a study: these three take ~320 of it).
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 240 python3 -m benchmarks gpu-wan --budget-s 100
