#!/usr/bin/env bash
# Run by the prepared GPU check (every executable benchmarks/gpu_*.sh): the FLUX-width caches of
# gpu_flux.sh again with the transformer's blocks compiled (torch.compile, regional, inductor):
# which caches keep their speedup as served compiled (benchmarks/gpu_flux.py --compile regional).
# --budget-s: no setting starts after that many seconds, so the table of what was measured prints
# inside the check's time (about 500 s for all scripts and a study: these three take ~320 of it).
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 240 python3 -m benchmarks gpu-flux --compile regional --budget-s 140
