#!/usr/bin/env bash
# Download the small wheels the GPU machine lacks into benchmarks/gpu_wheels/ (gitignored), for
# benchmarks/gpu_check.sh to install there without a network.
#
# The GPU image has torch, torchvision, numpy, pandas, pyarrow, click, PyYAML, scipy and
# matplotlib, but neither Ray nor pydantic. The single-process path (`ray-lips run --local`,
# benchmarks/bench_gpu.py) needs only pydantic on top of the image: pydantic, pydantic-core,
# annotated-types, typing-inspection and typing-extensions, at the versions of constraints.txt.
# Ray is not needed (nor carried: its wheel is larger than one device command may carry).
#
#   bash benchmarks/fetch_gpu_wheels.sh
#
# PY_VERSIONS and PLATFORMS choose the wheels of the compiled one (pydantic-core); the image's
# Python version is not known in advance, so several are fetched (about 2 MB each).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${DEST:-$ROOT/benchmarks/gpu_wheels}"
PY_VERSIONS="${PY_VERSIONS:-3.10 3.11 3.12 3.13}"
PLATFORMS="${PLATFORMS:-manylinux_2_17_x86_64 manylinux2014_x86_64}"
PYTHON="${PYTHON:-python3}"

pin() {  # the version constraints.txt pins for a package (any spelling of its name)
    local want
    want="$(echo "$1" | tr 'A-Z_' 'a-z-')"
    awk -F'==' -v want="$want" '
        { name = tolower($1); gsub("_", "-", name) }
        name == want { print $2; found = 1 }
        END { if (!found) exit 1 }' "$ROOT/constraints.txt"
}

PACKAGES=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    PACKAGES+=("$name==$(pin "$name")")
done
echo "wheels: ${PACKAGES[*]}"
mkdir -p "$DEST"
platform_args=()
for platform in $PLATFORMS; do
    platform_args+=(--platform "$platform")
done
for version in $PY_VERSIONS; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp "${platform_args[@]}" --dest "$DEST" "${PACKAGES[@]}"
done
ls -l "$DEST"
du -sh "$DEST"
