#!/usr/bin/env bash
# Run by the prepared GPU check (every executable benchmarks/gpu_*.sh): diffusers' caches on a
# full-width FLUX transformer at reduced depth (benchmarks/gpu_flux.py).
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 200 python3 -m benchmarks gpu-flux
