#!/usr/bin/env bash
# Segment a folder with four concurrent shards on one machine, or across hosts with GNU parallel:
#   parallel -j 4 deeplab segment photos/ -r --out masks/ --shard {}/4 -q ::: 0 1 2 3
#   parallel -S host1,host2 ...   (the same, on other machines that share the folders)
# Usage: examples/parallel.sh IMAGES OUT [SHARDS]
set -euo pipefail
shards="${3:-4}"
seq 0 $((shards - 1)) | xargs -P "$shards" -I{} deeplab segment "$1" -r --out "$2" --shard "{}/$shards" -q --jobs 1 --threads 1
