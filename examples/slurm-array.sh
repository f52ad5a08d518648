#!/usr/bin/env bash
# Segment a folder with a SLURM job array: each task takes its own slice and all write into one tree.
#
#   DEEPLAB_HOME=/shared/deeplab deeplab models pull largefov-voc12   # once, on a node with internet
#   sbatch examples/slurm-array.sh /shared/photos /shared/masks
#   sbatch --array=3,7 examples/slurm-array.sh /shared/photos /shared/masks   # rerun tasks that failed
#
# Slices depend only on the sorted input list and SHARDS, so a rerun of task K redoes slice K, and
# images it had already finished are skipped. Keep SHARDS equal to the size of --array.
#SBATCH --job-name=deeplab
#SBATCH --array=0-15
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
set -euo pipefail
SHARDS=16
export DEEPLAB_HOME="${DEEPLAB_HOME:-/shared/deeplab}"
export DEEPLAB_OFFLINE=1  # compute nodes use the pulled model and never touch the network
exec deeplab segment "$1" -r --out "$2" --shard "${SLURM_ARRAY_TASK_ID}/${SHARDS}" --jobs "${SLURM_CPUS_PER_TASK:-1}" -q
