#!/usr/bin/env bash
# Creates benchmarks/.flower-venv for bench_peers.py: Flower's simulation engine pins its own Ray
# (flwr 1.42.0 -> ray 2.55.1), so it cannot share ray-lips's .venv (Ray 2.60). torch and numpy
# follow ray-lips's constraints so both sides run the same kernels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${FLOWER_VENV:-$here/.flower-venv}"
python="${PYTHON:-python3}"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
grep -E '^(torch|numpy|nvidia-|cuda-|triton)' "$here/../constraints.txt" > "$pins"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet -c "$pins" "flwr[simulation]==1.42.0" torch numpy psutil
"$venv/bin/python" -c "import flwr, ray, torch; print('flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
