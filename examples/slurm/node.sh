#!/bin/bash
# One per node, started by srun from train.sbatch: runs examples/recipes/run.sh (torchrun, one
# rank per GPU) with the exit signal left to the ranks.
#
# Environment from train.sbatch: MASTER_ADDR, MASTER_PORT, NNODES, RDZV_ID, EXIT_SIGNAL and
# run.sh's own variables. Arguments: RECIPE [pretrain_mhc.py args], as for run.sh.
set -euo pipefail
: "${SLURM_NODEID:?start this with srun from examples/slurm/train.sbatch}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

export NODE_RANK="$SLURM_NODEID"
echo "node ${SLURMD_NODENAME:-$(hostname)}: node rank $NODE_RANK of $NNODES," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"

# torchrun must not act on the exit signal. By default it catches SIGTERM (and would die of
# SIGUSR1), sends the same signal to the ranks, and SIGKILLs them 30 s later, in the middle of
# their checkpoint save. An ignored signal stays ignored across exec, and torchrun (torch >= 2.9)
# leaves alone any signal not in --signals-to-handle (PET_SIGNALS_TO_HANDLE): it ignores it while
# the ranks, which inherit SIG_IGN too, install Megatron's handler over it. With torch < 2.9
# torchrun always catches SIGTERM: use EXIT_SIGNAL=USR1 there.
case "${EXIT_SIGNAL:-TERM}" in
  TERM) export PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"; trap '' TERM ;;
  USR1) trap '' USR1 ;;
  *) echo "error: EXIT_SIGNAL=$EXIT_SIGNAL; use TERM or USR1" >&2; exit 2 ;;
esac
exec "$HERE/../recipes/run.sh" "$@"
