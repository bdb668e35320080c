#!/usr/bin/env bash
# Erase a concept on a Cloud TPU pod slice: every host runs the same command, data-parallel over
# every chip of the slice; process 0 writes the delta, metrics and plot, Orbax writes checkpoints.
#
#   TPU=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket CONCEPT="Van Gogh" bash scripts/launch_tpu_pod.sh
#
# The workdir must be a folder every host sees and that outlives the VMs, so that the checkpoints
# survive a preemption: here a GCS bucket mounted with gcsfuse at the same path on every host.
# Rerunning this script resumes from the latest checkpoint. A TPU preemption sends SIGTERM, on
# which esd-jax saves a checkpoint and exits 0.
set -euo pipefail
: "${TPU:?name of the TPU VM (pod slice)}" "${ZONE:?its zone}" "${BUCKET:?GCS bucket name, without gs://}"
CONCEPT=${CONCEPT:-"Van Gogh"}
CONFIG=${CONFIG:-configs/esd_x.py}
RUN=${RUN:-$(echo "$CONCEPT" | tr ' |' '__' | tr '[:upper:]' '[:lower:]')-$(basename "$CONFIG" .py)}
: "${REPO:?git URL of the esd-jax repository to clone on the hosts}"

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d esd-jax ] || git clone $REPO esd-jax
  cd esd-jax && git pull --ff-only
  pip install -q -U 'jax[tpu]' -e .
  mkdir -p \$HOME/bucket && (mountpoint -q \$HOME/bucket || gcsfuse --implicit-dirs $BUCKET \$HOME/bucket)
  ESD_JAX_MULTIHOST=1 esd-jax erase --config $CONFIG \
    --config.concept='$CONCEPT' --config.workdir=\$HOME/bucket/esd-runs/$RUN
"
