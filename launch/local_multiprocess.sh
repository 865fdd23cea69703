#!/usr/bin/env bash
# Run a dcd-jax command as N processes on this one machine, each with D fake CPU devices, joined
# by jax.distributed through a local coordinator: a rehearsal of a multi-host pod on a laptop.
#
#   launch/local_multiprocess.sh [-n 2] [-d 4] -- dcd-jax train --config configs/demo.yaml
#
# Each process reads its own share of the data; logs go to launch_logs/process_<i>.log.
set -euo pipefail
NPROC=2
NDEV=4
PORT=${DCD_PORT:-$((20000 + RANDOM % 20000))}
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NPROC=$2; shift 2 ;;
    -d) NDEV=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [-n NPROC] [-d DEVICES_PER_PROC] -- COMMAND..." >&2; exit 2; }
mkdir -p launch_logs
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$NDEV" \
  DCD_COORDINATOR_ADDRESS="localhost:$PORT" DCD_NUM_PROCESSES=$NPROC DCD_PROCESS_ID=$i DCD_CPU_COLLECTIVES=1 \
    "$@" > "launch_logs/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then status=1; echo "process $i failed; see launch_logs/process_$i.log" >&2; fi
done
tail -n 5 launch_logs/process_0.log
exit $status
