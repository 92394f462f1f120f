#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("GPU"), every method in one command: each
# paper config on generated data at its real shapes (`--config.data.source=synthetic`),
# 5 stacked seeds against one (`seeds_time_ratio`), batched evaluation against the loop
# (`eval_batched_speedup`), compile seconds, peak memory and the training loop's epoch
# overhead, one JSON line per config in $OUT/bench.jsonl (stderr beside it). The configs
# that fine-tune BERT (EASE, MCUR, CMAD) run with the data's text features in its place
# (`text_encoder=features`, as issue 17 measured them): no BERT weights can be fetched on
# the lent machine.
#
# On a machine lent by the `device` tool (its image has JAX with CUDA but not all of
# mer_jax's dependencies): first, here, `python benchmarks/gpu_wheels.py` (the missing
# ones as wheels in .whl/), then one call: run(command="bash benchmarks/gpu.sh",
# carry=[".whl"], timeout_s=540). Anywhere else: `PYTHON=.venv/bin/python bash
# benchmarks/gpu.sh` (on a CPU it runs too, slowly: `STEPS=1 CONFIGS=dqf_mosei` to try it).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/mer_jax_gpu_bench}
STEPS=${STEPS:-20}
CONFIGS=${CONFIGS:-"dqf_mosei ease_mosei mcur_mosei cmad_mosei cmarr_iemocap"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MER_JAX_DATA_DIR=${MER_JAX_DATA_DIR:-/tmp/mer_jax_gpu_data}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mer_jax_site .whl/*.whl
  export PYTHONPATH=/tmp/mer_jax_site:$PWD
else
  export PYTHONPATH=$PWD
fi

"$PYTHON" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee "$OUT/devices.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv >> "$OUT/devices.txt" || true

status=0
for config in $CONFIGS; do
  echo "== $config ($(date +%T))"
  # What the paper config reads from its own source only (the generated data has its
  # shapes): DQF's MERBench lengths, CM-ARR's MMIN feature names and lengths.
  extra=()
  case $config in
    dqf_*) extra=(--config.data.max_lengths="()") ;;
    cmarr_*) extra=(--config.data.features="()" --config.data.max_lengths="()") ;;
  esac
  if "$PYTHON" -m mer_jax.bench --config "configs/$config.py" --config.data.source=synthetic \
      --config.model.text_encoder=features "${extra[@]}" --config.num_seeds=5 \
      --steps "$STEPS" --repeats 3 --loop_epochs 3 \
      > "$OUT/$config.stdout" 2> "$OUT/$config.stderr"; then
    tail -n 1 "$OUT/$config.stdout" | tee -a "$OUT/bench.jsonl"
  else
    echo "$config failed; the end of $OUT/$config.stderr:"; tail -n 5 "$OUT/$config.stderr"
    status=1
  fi
done
exit $status
