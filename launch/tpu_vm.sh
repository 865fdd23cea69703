#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install dcd-jax on every worker, and run a command on all of them.
# JAX discovers the slice itself (dcd_jax/distributed.py calls jax.distributed.initialize()
# when TPU_WORKER_HOSTNAMES lists several hosts), so the same command runs everywhere.
#
#   export TPU_NAME=dcd-v5e TPU_ZONE=us-west4-a TPU_TYPE=v5litepod-16 TPU_VERSION=v2-alpha-tpuv5-lite
#   launch/tpu_vm.sh create                       # allocate the slice
#   launch/tpu_vm.sh setup                        # copy this checkout to every worker, pip install .[tpu]
#   launch/tpu_vm.sh run dcd-jax train --config configs/qwen2.5-1.5b-dcd.yaml train.out_dir=gs://my-bucket/dcd/runs/run1
#   launch/tpu_vm.sh ssh 0                        # a shell on worker 0
#   launch/tpu_vm.sh delete
#
# Data and checkpoints: gs:// URLs (every worker reads and writes the bucket; no shared disk needed).
# Preemption: spot/queued-resource slices send SIGTERM; training saves at the next step boundary
# and exits 0, and the same `run` command resumes from the latest checkpoint in train.out_dir.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${TPU_ZONE:?set TPU_ZONE}"
TPU_TYPE=${TPU_TYPE:-v5litepod-8}
TPU_VERSION=${TPU_VERSION:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-dcd-jax}
gc() { gcloud compute tpus tpu-vm "$@" --zone "$TPU_ZONE"; }
cmd=${1:-}; shift || true
case "$cmd" in
  create) gc create "$TPU_NAME" --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION" "$@" ;;
  setup)
    git archive --format=tar.gz -o /tmp/dcd-jax.tar.gz HEAD
    gc scp /tmp/dcd-jax.tar.gz "$TPU_NAME":/tmp/ --worker=all
    gc ssh "$TPU_NAME" --worker=all --command \
      "mkdir -p $REMOTE_DIR && tar -xzf /tmp/dcd-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && pip install -q -e '.[tpu]'" ;;
  run) gc ssh "$TPU_NAME" --worker=all --command "cd $REMOTE_DIR && $*" ;;
  ssh) gc ssh "$TPU_NAME" --worker="${1:-0}" ;;
  delete) gc delete "$TPU_NAME" --quiet ;;
  *) echo "usage: $0 create|setup|run CMD...|ssh [WORKER]|delete" >&2; exit 2 ;;
esac
