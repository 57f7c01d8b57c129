#!/usr/bin/env bash
# The GPU check of issue 12, end to end, in about 8 minutes on one GPU machine: versions, the
# carried wheels, then benchmarks/bench_gpu.py's three parts, each under its own time limit.
# Everything goes to $OUT (the device tool's output folder; ./gpu_out when unset): the parts'
# CSV/JSON/txt files, gpu_check.log (all output), versions.txt, parts_rc.txt and summary.txt.
#
# Here, once:            bash benchmarks/fetch_gpu_wheels.sh      (fills benchmarks/gpu_wheels/)
# On the GPU machine:    bash benchmarks/gpu_check.sh
#
# The image there has torch, torchvision, numpy, pandas, pyarrow, click and PyYAML but no Ray
# and no pydantic: the package runs from this checkout (PYTHONPATH, no install) on the
# single-process path, with pydantic installed from the carried wheels into a scratch folder.
# Limits (seconds, environment): STEPS_S (150), ROUNDS_S (220), ACCURACY_S (75); ACC_ROUNDS (15)
# rounds per precision in the accuracy part; PYTHON (python3); EXTRA_ARGS for bench_gpu.py;
# DEVICE (cuda; "DEVICE=cpu EXTRA_ARGS=--quick" runs the whole script as a CPU smoke test).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="$REPO/benchmarks/gpu_wheels"
DEPS="${TMPDIR:-/tmp}/ray_lips_gpu_deps"
STEPS_S="${STEPS_S:-150}"
ROUNDS_S="${ROUNDS_S:-220}"
ACCURACY_S="${ACCURACY_S:-75}"
ACC_ROUNDS="${ACC_ROUNDS:-15}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
DEVICE="${DEVICE:-cuda}"
started=$(date +%s)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

echo "== gpu_check.sh $(date -u +%FT%TZ) in $REPO, output in $OUT"
{
    echo "host: $(uname -a)"
    echo "cpus: $(nproc)"
    free -g 2>/dev/null | head -2
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib
import importlib.metadata
import sys

print("python", sys.version.split()[0], sys.executable)
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for module, dist in (("torchvision", "torchvision"), ("numpy", "numpy"), ("pandas", "pandas"),
                     ("pyarrow", "pyarrow"), ("click", "click"), ("yaml", "PyYAML"),
                     ("pydantic", "pydantic"), ("pydantic_core", "pydantic-core"),
                     ("typing_extensions", "typing-extensions"), ("ray", "ray"),
                     ("sklearn", "scikit-learn"), ("scipy", "scipy")):
    try:
        importlib.import_module(module)
        print(dist, importlib.metadata.version(dist))
    except ImportError:
        print(dist, "missing")
    except importlib.metadata.PackageNotFoundError:
        print(dist, "importable, version unknown")
EOF
} | tee "$OUT/versions.txt"

echo "== dependencies"
if "$PY" -c "import pydantic" 2>/dev/null; then
    echo "pydantic is installed already"
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    rm -rf "$DEPS"
    mkdir -p "$DEPS"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --no-compile --disable-pip-version-check \
            --find-links "$WHEELS" --target "$DEPS" pydantic
    else  # no pip: unpack the wheels that fit this interpreter
        "$PY" - "$WHEELS" "$DEPS" <<'EOF'
import platform
import sys
import zipfile
from pathlib import Path

wheels, target = Path(sys.argv[1]), Path(sys.argv[2])
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
for wheel in sorted(wheels.glob("*.whl")):
    pure = "-none-any" in wheel.name
    if pure or (f"-{tag}-" in wheel.name and platform.machine() in wheel.name):
        zipfile.ZipFile(wheel).extractall(target)
        print("unpacked", wheel.name)
EOF
    fi
    export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed into $DEPS: $(ls "$DEPS" | grep -v -e '^bin$' | tr '\n' ' ')"
else
    echo "pydantic is missing and $WHEELS holds no wheels: run 'bash benchmarks/fetch_gpu_wheels.sh'"
    echo "on the development machine and carry benchmarks/gpu_wheels"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import ray_lips.core.run, ray_lips.cli.commands; import sys; \
assert 'ray' not in sys.modules; print('ray_lips imports without Ray')"; then
    echo "ray_lips does not import; stopping"
    exit 1
fi

run_part() {  # NAME LIMIT_S [bench_gpu.py args]: one part, its soft budget 25 s under the limit
    local name=$1 limit=$2
    shift 2
    local begin rc
    begin=$(date +%s)
    echo "== part $name (limit ${limit} s)"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
    timeout -k 20 "$limit" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --out "$OUT" \
        --parts "$name" --budget-s $((limit - 25)) "$@" $EXTRA_ARGS
    rc=$?
    echo "part $name: exit $rc after $(($(date +%s) - begin)) s" | tee -a "$OUT/parts_rc.txt"
}

: > "$OUT/parts_rc.txt"
run_part steps "$STEPS_S"
run_part rounds "$ROUNDS_S"
run_part accuracy "$ACCURACY_S" --acc-rounds "$ACC_ROUNDS"

{
    echo "# GPU check, $(date -u +%FT%TZ), $(($(date +%s) - started)) s"
    echo
    cat "$OUT/versions.txt"
    echo
    cat "$OUT/parts_rc.txt"
    for part in steps rounds accuracy; do
        echo
        cat "$OUT/$part.txt" 2>/dev/null || echo "($part.txt missing: see gpu_check.log)"
    done
} > "$OUT/summary.txt"
echo "== done in $(($(date +%s) - started)) s; summary: $OUT/summary.txt"
