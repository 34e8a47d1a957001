#!/usr/bin/env bash
# Run by the prepared GPU check (every executable benchmarks/gpu_*.sh): diffusers' caches on a
# full-width FLUX transformer at reduced depth (benchmarks/gpu_flux.py).
# --budget-s: no setting starts after that many seconds, so the table of what was measured prints
# inside the check's time (about 500 s for all scripts and a study: these three take ~320 of it).
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 200 python3 -m benchmarks gpu-flux --budget-s 80
