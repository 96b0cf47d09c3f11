#!/bin/bash
# shellcheck disable=SC2317,SC2329  # functions run only from the USR1 trap: "unreachable" (0.9), "unused" (0.10+)
# One node's task of a Slurm job step: run COMMAND (a recipe that calls torchrun) so that SIGUSR1,
# Slurm's advance warning (--signal=USR1@120), reaches the trainer processes and nothing else:
#
#   * COMMAND starts with SIGUSR1 ignored; the ignore is inherited through exec, so the recipe's
#     shell and torchrun's agent survive the signal (its default action would kill the agent and,
#     with it, the step). torchrun's workers inherit "ignore" too until the trainer installs its
#     handler (stablemoe_megatron/training/loop.py), which saves a checkpoint and exits 0.
#   * This script traps SIGUSR1, forwards it to every process below it (the workers run in their
#     own sessions, which proctrack plugins that signal process groups would miss; a worker that
#     also got it from Slurm just sees the flag set twice) and, when PREEMPT_MARKER is set, creates
#     that file so the batch script knows to requeue the job.
#
# NODE_RANK is SLURM_NODEID under srun (examples/common.sh passes it to torchrun).
#   usage: launch_node.sh COMMAND [ARGS...]
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: launch_node.sh COMMAND [ARGS...]" >&2
  exit 2
fi
export NODE_RANK=${SLURM_NODEID:-${NODE_RANK:-0}}

descendants() {
  local pid
  for pid in $(pgrep -P "$1" || true); do
    echo "$pid"
    descendants "$pid"
  done
}

interrupted=0
child=""
on_usr1() {
  interrupted=1
  if [ -n "${PREEMPT_MARKER:-}" ]; then
    : > "$PREEMPT_MARKER"
  fi
  local pid
  if [ -n "$child" ]; then
    for pid in $(descendants "$child"); do
      kill -USR1 "$pid" 2>/dev/null || true
    done
  fi
  echo "launch_node.sh (node ${NODE_RANK}): SIGUSR1 received and passed to the trainer processes" >&2
}

trap on_usr1 USR1
( trap '' USR1; exec "$@" ) &
child=$!
while :; do
  interrupted=0
  status=0
  wait "$child" || status=$?
  # `wait` returns early when the trap runs; wait again for the command's own exit status
  [ "$interrupted" = 1 ] || break
done
exit "$status"
