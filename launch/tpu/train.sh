#!/bin/bash
# Training on a multi-host Cloud TPU VM slice: the same command on every worker.
#
#   launch/tpu/train.sh TPU_NAME ZONE configs/mcur_mosei.py gs://bucket/runs/mcur_mosei \
#       [--config.train.batch_size=1024 ...]
#
# Copies the repository to every worker, sets it up there (bash setup.sh, then
# `pip install 'jax[tpu]'`), and starts `python -m mer_jax.train --distributed` on all
# workers at once; jax.distributed.initialize() discovers the slice by itself. The
# workdir must be visible to every worker (a GCS bucket or a shared disk).
set -euo pipefail
TPU=${1:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
ZONE=${2:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
CONFIG=${3:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
WORKDIR=${4:?usage: launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
shift 4
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OVERRIDES=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU":~/mer_jax --zone="$ZONE" --worker=all \
  --scp-flag=--exclude=.venv
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd ~/mer_jax
  [ -x .venv/bin/python ] || { bash setup.sh && .venv/bin/pip install -q 'jax[tpu]'; }
  .venv/bin/python -m mer_jax.train --distributed --config $CONFIG --workdir $WORKDIR $OVERRIDES"
