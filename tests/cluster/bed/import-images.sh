#!/usr/bin/env bash
# Import local Docker images into both nodes' containerd (the pods' imagePullPolicy is Never: nothing is
# pulled from a registry). Both nodes import at once, one `docker save` stream each.
#   BED=<state folder> tests/cluster/bed/import-images.sh ref...
set -euo pipefail
: "${BED:?set BED to the bed state folder}"
pids=()
for n in 1 2; do
  (docker save "$@" | ctr -a "$BED/containerd$n/containerd.sock" -n k8s.io images import - >/dev/null) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
