#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the SAME command runs on EVERY host (worker) of the slice.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a ./launch/tpu_pod.sh configs/perce_longlamp.py:review,qwen3-14b gs://bucket/runs/prw \
#       --config.data.train=gs://bucket/prepared/prw.train.jsonl
#
# Pitfall: running on one host only. Every host must run the program, or the hosts that did start hang in
# jax.distributed.initialize / the first collective ("TPU backend initialization is taking more than 60 seconds.
# Did you run your code on all TPU hosts?"). `--worker=all` below is what prevents it; never ssh to a single worker
# to "try it first" on a multi-host slice. JAX detects the pod itself (no coordinator flags needed on TPU VMs).
# The workdir must be shared by all hosts (a gs:// bucket or a mounted filesystem): Orbax writes one checkpoint
# from all hosts together and each host stores its own Grain iterator state.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?config file (with optional :ARG)}; WORKDIR=${2:?workdir}; shift 2
REPO_URL=${REPO_URL:-https://github.com/percausal/percausal_jax.git}
REMOTE_DIR=${REMOTE_DIR:-~/percausal_jax}

# 1. install on every host (idempotent)
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d $REMOTE_DIR ] || git clone -q $REPO_URL $REMOTE_DIR
  cd $REMOTE_DIR && git pull -q && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"

# 2. the same training command on every host; re-running this script resumes from the newest checkpoint
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REMOTE_DIR && .venv/bin/percausal train --config $CONFIG --workdir $WORKDIR --no-progress $*"
