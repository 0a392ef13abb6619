#!/usr/bin/env bash
# GPU check: every CUDA path of the project in one call, about 8 minutes on one NVIDIA H200,
# each step stopped by its own timeout (and all by one budget), every table and log in one folder.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU: --device cuda
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # every step at tiny sizes, --device cpu (2-3 min on
#                                                 # 2 cores; CI runs it: tests/test_gpu_check.py)
#
# Steps, in this order: setup (which Python, torch and CUDA); tests (pytest -m device --device cuda);
# run-glyphs (run.py's default job, short); run-omniglot (real Omniglot: Lake's protocol on 20 runs
# built from Korean, held out of images_background_small1.zip by studies.lake_proxy);
# run-torchrun (torchrun --nproc-per-node 1, --dist-backend nccl); memory (benchmarks.memory at 1,
# 5, 25, 50 inner steps); then one throughput row per method (benchmarks.throughput, THROUGHPUT_ROWS
# below). Options: --out DIR (default $OUT if set, else runs/gpu_check), --data-root DIR (glyphs,
# default data), --omniglot-zip FILE (or GPU_CHECK_OMNIGLOT_ZIP; default .gpu-data/, else
# ../shared/data/omniglot/, images_background_small1.zip), --budget S (420: seconds for all steps
# after the setup, itself at most 60), --work DIR (run outputs; default a temporary folder,
# removed), --only STEP,STEP (the others: "not selected"); paths from the repo root.
# The folder gets setup.log, tests.log, run-glyphs.log, run-omniglot.log, run-torchrun.log (each run's
# results.json at its end), memory.md, throughput.md and summary.txt: one line per step, ok / failed
# rc N / timed out / skipped; the exit status is 1 if any selected step is not ok.
#
# On the device tool's GPU machine (Python 3.12 with a CUDA torch, no network), from the repo root:
#   1. here, once: what python3 lacks there, and the real Omniglot zip, into folders .gitignore ignores:
#        .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp -d .whl betty-ml==0.1.1     # pip < 24.1 (the venv's) takes its metadata
#        mkdir -p .gpu-data && cp ../shared/data/omniglot/images_background_small1.zip .gpu-data/
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
#      The 8 files come back from $OUT (the tool returns at most 8). Then give_back.
#   3. with device time left, rerun only what failed, e.g. --only run-glyphs,throughput-anil.
# Python: IMAML_PYTHON if set; else .venv/bin/python; else with IMAML_TORCH set scripts/setup-env.sh
# builds .venv (README, "Installation"); else the machine's python3 with the wheels of .whl/ it
# lacks unpacked into a folder on PYTHONPATH (pure-Python wheels are zips of their files; pip >= 24.1
# refuses betty-ml 0.1.1's metadata, and a venv made from python3, itself a venv there, would not
# see its torch). Only betty-ml is missing there on these paths: wandb and learn2learn load lazily.
set -uo pipefail
cd "$(dirname "$0")/.."

# One line per throughput row: its name, then benchmarks.throughput's flags. The head rows take a
# --lower-problem today; with issue 32's settings they become `--adapt head --head-init zero`
# (iMAML head) and `--adapt head` (ANIL). Extension Lower problems run per task only, so their
# vectorized column says why it is empty. The Betty reference adapts the whole network: it is timed
# in the whole-network rows, the head rows compare with those.
THROUGHPUT_ROWS=(
  "imaml-network --algos imaml --impls engine-per-task engine-vectorized betty"
  "imaml-head    --algos imaml --impls engine-per-task engine-vectorized --adapt head --head-init zero"
  "maml          --algos maml  --impls engine-per-task engine-vectorized betty"
  "anil          --algos maml  --impls engine-per-task engine-vectorized --adapt head"
)

DRY=0 OUT_DIR=${OUT:-runs/gpu_check} DATA=data BUDGET=420 WORK= ONLY=
ZIP=${GPU_CHECK_OMNIGLOT_ZIP:-}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry-run) DRY=1 ;;
    --out|--data-root|--omniglot-zip|--budget|--work|--only)
      [ $# -ge 2 ] || { echo "gpu_check: $1 needs a value" >&2; exit 2; }
      case $1 in --out) OUT_DIR=$2 ;; --data-root) DATA=$2 ;; --omniglot-zip) ZIP=$2 ;; --budget) BUDGET=$2 ;;
                 --work) WORK=$2 ;; --only) ONLY=$2 ;; esac
      shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$ZIP" ]; then
  ZIP=.gpu-data/images_background_small1.zip
  [ -f "$ZIP" ] || ZIP=../shared/data/omniglot/images_background_small1.zip
fi
if [ -z "$WORK" ]; then WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$OUT_DIR" "$WORK" "$DATA" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd) WORK=$(cd "$WORK" && pwd) DATA=$(cd "$DATA" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 IMAML_TEST_DATA=$DATA

if [ $DRY = 1 ]; then  # tiny sizes: every step's path, not its numbers
  DEVICE=cpu BACKEND=gloo
  TESTS=(-k second_order_unroll)  # two quick device tests: the step's path, not the suite
  RUN=(--meta-steps 2 --val-every 2 --val-tasks 2 --test-tasks 4 --meta-batch-size 2 --inner-steps 2 --test-inner-steps 2
       --channels 4)
  ONE_PROCESS=(--processes 1)
  MEMORY=(--inner-steps 1 --ways 2 --meta-batch-size 2 --threads 1)
  SIZES=(--shapes omniglot --ways 2 --meta-batch-sizes 2 --inner-steps 1 --cg-steps 1 --warmup 0 --rounds 1 --threads 1)
else
  DEVICE=cuda BACKEND=nccl
  TESTS=()
  RUN=(--meta-steps 40 --val-every 20 --val-tasks 20 --test-tasks 100)
  ONE_PROCESS=()
  MEMORY=(--inner-steps 1 5 25 50)
  SIZES=(--shapes omniglot miniimagenet --ways 5 20 --meta-batch-sizes 32 --warmup 1 --rounds 1)
fi

# ---------------------------------------------------------------- steps: begin, then sub ..., then finish
SUMMARY=() FAILED=0 DEADLINE=$((SECONDS + 600)) WRITTEN=" "
begin() {  # begin NAME LIMIT LOG: a step of at most LIMIT seconds (less if the budget runs out)
  STEP=$1 STEP_LOG=$OUT_DIR/$3 STEP_RC=0 STEP_NOTE= STEP_START=$SECONDS
  local limit=$2 left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  STEP_END=$((SECONDS + limit))
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$STEP,"* ]] && [ "$STEP" != setup ]; then
    STEP_RC=-1 STEP_NOTE="not selected"
  elif ((limit <= 0)); then
    STEP_RC=-1 STEP_NOTE="skipped: out of time" FAILED=1
  else
    echo "== $STEP (at most ${limit} s), $(date +%T)"
    [[ $WRITTEN == *" $3 "* ]] || { : >"$STEP_LOG"; WRITTEN+="$3 "; }  # this call's output only
  fi
}
sub() {  # sub CMD...: run CMD in the current step, output to its log, within what is left of its time
  [ "$STEP_RC" = 0 ] || return 0
  local left=$((STEP_END - SECONDS))
  { printf '$'; printf ' %q' "$@"; echo; } >>"$STEP_LOG"  # as it can be pasted back
  if ((left <= 0)); then STEP_RC=124; return 0; fi
  timeout -k 10 "$left" "$@" </dev/null >>"$STEP_LOG" 2>&1
  STEP_RC=$?
  ((STEP_RC == 137 && SECONDS < STEP_END)) && return 0  # killed before its time: a failure, not a timeout
  ((STEP_RC == 137)) && STEP_RC=124
  return 0
}
skip() { STEP_RC=-1 STEP_NOTE="skipped: $1" FAILED=1; }
finish() {
  local status
  case $STEP_RC in
    0) status=ok ;;
    -1) status=$STEP_NOTE ;;
    124) status="timed out"; FAILED=1 ;;
    *) status="failed rc $STEP_RC"; FAILED=1 ;;
  esac
  [ "$STEP_RC" = -1 ] || status="$status ($((SECONDS - STEP_START)) s)"
  SUMMARY+=("$(printf '%-24s %s' "$STEP" "$status")")
  [ "$STEP_NOTE" = "not selected" ] || echo "   $STEP: $status"
}

# ---------------------------------------------------------------- setup: the interpreter, torch, CUDA
set_up_python() {  # sets PY
  if [ -n "${IMAML_PYTHON:-}" ]; then PY=$IMAML_PYTHON
  elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
  elif [ -n "${IMAML_TORCH:-}" ]; then sub bash scripts/setup-env.sh .venv; PY=.venv/bin/python
  else
    PY=python3
    export PYTHONPATH=$PYTHONPATH:$WORK/site
    [ -d .whl ] && sub "$PY" -c '
import importlib.metadata as metadata, os, sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:  # each carried wheel whose distribution this Python lacks, unpacked
    name = os.path.basename(wheel).split("-")[0]
    try:
        print(f"{name} {metadata.version(name)}: already installed, {wheel} not used")
    except metadata.PackageNotFoundError:
        zipfile.ZipFile(wheel).extractall(site)
        print(f"{name}: unpacked from {wheel} into {site}")' "$WORK/site" .whl/*.whl
  fi
  sub "$PY" -c '
import sys, torch, betty
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else "") + f"; betty-ml {betty.__version__}")'
}

begin setup $([ -n "${IMAML_TORCH:-}" ] && echo 600 || echo 60) setup.log
echo "gpu_check${ONLY:+ --only $ONLY}$([ $DRY = 1 ] && echo ' --cpu-dry-run') on $(uname -n)," \
     "$(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >>"$STEP_LOG"
set_up_python
tail -1 "$STEP_LOG"
finish
DEADLINE=$((SECONDS + BUDGET))  # the budget starts once the interpreter is there

# ---------------------------------------------------------------- tests marked `device`
begin tests 120 tests.log
sub "$PY" -m pytest tests -m device --device "$DEVICE" -q -p no:cacheprovider "${TESTS[@]}"
finish

# ---------------------------------------------------------------- short real runs
begin run-glyphs 75 run-glyphs.log
sub "$PY" run.py --device "$DEVICE" --data-root "$DATA" --output-dir "$WORK/glyphs" "${RUN[@]}" "${ONE_PROCESS[@]}"
sub cat "$WORK/glyphs/results.json"
finish

begin run-omniglot 75 run-omniglot.log
if [ "$STEP_RC" = 0 ] && [ ! -f "$ZIP" ] && [ $DRY = 1 ]; then  # as the tests do: small files, official format
  echo "# $ZIP is absent: a small stand-in in the official format" >>"$STEP_LOG"
  ZIP=$WORK/stand-in/images_background_small1.zip
  sub "$PY" -c "import sys; from tests.benchmark_files import write_background_stand_in as w; w(sys.argv[1])" "$ZIP"
fi
if [ "$STEP_RC" = 0 ] && [ ! -f "$ZIP" ]; then
  echo "no data: $ZIP is absent" >>"$STEP_LOG"; skip "no data ($ZIP)"
fi
sub "$PY" -m studies.lake_proxy --source "$ZIP" --hold-out Korean --out "$WORK/lake"
sub "$PY" run.py --config configs/omniglot-lake-imaml-head-cpu.yaml --data-root "$WORK/lake" --device "$DEVICE" \
    --output-dir "$WORK/omniglot" "${RUN[@]}" --test-tasks 20 "${ONE_PROCESS[@]}"  # the meta-test: the 20 runs
sub cat "$WORK/omniglot/results.json"
finish

begin run-torchrun 60 run-torchrun.log
sub "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 run.py --device "$DEVICE" \
    --dist-backend "$BACKEND" --algo maml --data-root "$DATA" --output-dir "$WORK/torchrun" "${RUN[@]}"
sub cat "$WORK/torchrun/results.json"
finish

# ---------------------------------------------------------------- benchmarks
begin memory 90 memory.md
sub "$PY" -m benchmarks.memory --device "$DEVICE" "${MEMORY[@]}"
finish

for row in "${THROUGHPUT_ROWS[@]}"; do
  read -r -a flags <<<"$row"
  begin "throughput-${flags[0]}" 75 throughput.md
  [ "$STEP_RC" = 0 ] && echo -e "\n## ${flags[0]}" >>"$STEP_LOG"
  sub "$PY" -m benchmarks.throughput --device "$DEVICE" --no-peak-memory "${SIZES[@]}" "${flags[@]:1}"
  finish
done

# ---------------------------------------------------------------- what came out
for table in memory.md throughput.md; do  # the tables this call wrote
  [[ $WRITTEN == *" $table "* ]] && { echo; echo "---- $table"; grep -E '^(\||#)' "$OUT_DIR/$table"; }
done
printf '%s\n' "${SUMMARY[@]}" >"$OUT_DIR/summary.txt"
echo; echo "---- summary ($OUT_DIR; $SECONDS s in all)"; cat "$OUT_DIR/summary.txt"
exit $FAILED
