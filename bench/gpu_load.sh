#!/usr/bin/env bash
# Load benchmark on a machine with an NVIDIA GPU, in one go (about 5 minutes): spotstart load
# --device cuda vs --device cpu vs safetensors load_file(device="cuda"), through the emulated
# cloud with a data-centre link (200 MB/s per connection, 2 GB/s aggregate), 4 GB checkpoint,
# every tensor checked bit for bit against the local source files.
#
#   bash bench/gpu_load.sh                 # results in $OUT if set, else bench/results/
#   SHARDS=2 SHARD_MB=500 REPEATS=1 bash bench/gpu_load.sh
#   CPU_ONLY=1 SHARDS=2 SHARD_MB=16 REPEATS=1 bash bench/gpu_load.sh   # harness check, no GPU
#
# Needs Python >= 3.11 and the repository checked out; installs spotstart[dev,torch] into a
# venv that sees the system's packages (a preinstalled CUDA torch is kept). SKIP_INSTALL=1
# uses the current python as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu-load}
SHARDS=${SHARDS:-4}
SHARD_MB=${SHARD_MB:-1000}
REPEATS=${REPEATS:-2}
BUDGET_S=${BUDGET_S:-270} # the benchmark itself; installing comes before
OUT_DIR=${OUT:-bench/results}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
	if [[ ! -x "$VENV/bin/python" ]]; then
		"$PYTHON" -m venv --system-site-packages "$VENV"
	fi
	PYTHON="$VENV/bin/python"
	"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[dev,torch]'
fi

"$PYTHON" - <<'EOF'
import sys, torch, safetensors, spotstart
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}),"
      f" cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"gpu: {torch.cuda.get_device_name(0)}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
	--format=csv,noheader || true

args=(--shards "$SHARDS" --shard-mb "$SHARD_MB" --repeats "$REPEATS" --out-dir "$OUT_DIR")
if [[ "${CPU_ONLY:-0}" == 1 ]]; then
	args+=(--cpu-only)
fi
mkdir -p "$OUT_DIR"
# drop_caches needs root; without it the report says the page cache was not dropped
timeout --kill-after=10 "$BUDGET_S" "$PYTHON" bench/load/gpu.py "${args[@]}" "$@"
