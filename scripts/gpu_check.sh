#!/usr/bin/env bash
# GPU check: (a) environment, (b) the to-GPU loader benchmark on a ~1 GB generated checkpoint, (c) the
# Tokasaurus engine path (start -> /ping -> completions -> stop, no process left), within ~8 minutes.
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from the repo root, as root; .whl/ carried
#   bash scripts/gpu_check.sh --dry-run    # here, on CPU: tiny checkpoints, device cpu, no wheel install;
#                                          # TOKA_SITE=DIR runs Tokasaurus from DIR (it fails without a GPU)
#
# Logs and results go to ${OUT:-/tmp/gpu_check_out}: gpu_check.log (everything), <part>.log, <part>.json,
# parts.tsv (name, exit code, seconds) and results.json (the summary). Every part runs under its own
# timeout whatever happened before, and the script exits 0: read results.json for what passed.
# Tokasaurus and the packages it needs that the GPU image lacks come from .whl/*.whl (installed into
# /tmp/site) and .whl/hf/*.whl (transformers 4.53 as Tokasaurus pins it, into /tmp/site-hf): a first
# attempt runs with both, a second (only if the first crashed) with the image's own transformers.
set -u
cd "$(dirname "$0")/.." || exit 0
REPO=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}  # all parts together; the device call leaves some minutes around it
T0=$(date +%s)
export PYTHONPATH=$REPO  # the project is not installed there; Tokasaurus gets the wheel sites on top
: > "$OUT/parts.tsv"

left() { echo $(( T0 + TOTAL_S - $(date +%s) )); }

part() {  # part NAME LIMIT_S CMD...: run CMD under a timeout, output to $OUT/NAME.log, record exit code and time
  local name=$1 limit=$2 t rc
  shift 2
  t=$(date +%s)
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, ${limit}s left"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/parts.tsv"
    return
  fi
  echo "=== $name (limit ${limit}s, $(left)s left in all): $*"
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$OUT/parts.tsv"
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - t ))s"
}

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# (a) environment
part env 60 "$PY" scripts/gpu_check.py env --json "$OUT/env.json" $([ $DRY = 0 ] && echo --require-gpu)

# the carried wheels (never the network: there is none there)
SITES=()
if [ $DRY = 0 ]; then
  part install 90 bash -c "rm -rf /tmp/site /tmp/site-hf && ls -l .whl .whl/hf &&
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-hf \
      .whl/hf/*.whl && ls /tmp/site /tmp/site-hf"
  SITES=(--site /tmp/site-hf:/tmp/site --site /tmp/site)
elif [ -n "${TOKA_SITE:-}" ]; then
  SITES=(--site "$TOKA_SITE")
fi

# (b) loader to GPU memory: tierlab vs raw read + .to(cuda) vs safetensors, cold cache, 3 rounds
if [ $DRY = 0 ]; then
  part loader "$(min 150 $(( $(left) - 150 )))" "$PY" scripts/gpu_check.py loader --device cuda --preset large \
    --rounds 3 --json "$OUT/loader.json"
else
  part loader 120 "$PY" scripts/gpu_check.py loader --device cpu --preset tiny --rounds 1 --json "$OUT/loader.json"
fi

# (c) Tokasaurus: whatever time is left, less the summary's
LIMIT=$(( $(left) - 20 ))
[ $DRY = 1 ] && LIMIT=$(min "$LIMIT" 200)
part toka "$LIMIT" "$PY" scripts/gpu_check.py toka ${SITES[@]+"${SITES[@]}"} --budget-s $(( LIMIT - 15 )) --json "$OUT/toka.json" \
  --log-dir "$OUT" --pgid-file "$OUT/toka.pgid"
# the part stops its engine itself, even on SIGTERM; if it was SIGKILLed, its engine's group goes here
if [ -s "$OUT/toka.pgid" ] && "$PY" -c "import sys; from live.engines import running_group_members as r
sys.exit(0 if r(int(sys.argv[1])) else 1)" "$(cat "$OUT/toka.pgid")"; then
  echo "killing engine process group $(cat "$OUT/toka.pgid"), left running by the toka part"
  kill -KILL -- "-$(cat "$OUT/toka.pgid")"
fi

"$PY" scripts/gpu_check.py summary --out "$OUT" || echo "summary failed; see $OUT/parts.tsv"
echo "gpu_check done in $(( $(date +%s) - T0 ))s; results in $OUT"
exit 0
