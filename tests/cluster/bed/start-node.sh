#!/usr/bin/env bash
# One node of the bed: its own containerd and kubelet, inside a private mount namespace (start.sh runs
# this under `unshare --mount --propagation private`) that bind-mounts $BED/nodeN/var-log-pods on
# /var/log/pods and $BED/nodeN/var-log-containers on /var/log/containers.
# Why: kubelet 1.20 hard-codes /var/log/pods, and each kubelet's container GC deletes the log folders of
# pods it does not own, so two kubelets sharing it destroy each other's logs. Every mount the kubelet and
# containerd make stays in this namespace and goes away with its processes.
# This script execs the kubelet (its pid is the one start.sh recorded); containerd's pid goes to
# $BED/pids/containerdN.pid.
set -eu
: "${BED:?}" "${BIN:?}"
N=${1:?node number 1 or 2}
mkdir -p "$BED/node$N/var-log-pods" "$BED/node$N/var-log-containers" /var/log/pods /var/log/containers
mount --bind "$BED/node$N/var-log-pods" /var/log/pods
mount --bind "$BED/node$N/var-log-containers" /var/log/containers
containerd --config "$BED/containerd$N/config.toml" >"$BED/logs/containerd$N.log" 2>&1 </dev/null &
echo $! >"$BED/pids/containerd$N.pid"
for _ in $(seq 1 60); do
  ctr -a "$BED/containerd$N/containerd.sock" version >/dev/null 2>&1 && break
  sleep 0.5
done
# shellcheck disable=SC2046
exec "$BIN/bin/kubelet" $(cat "$BED/cfg/kubelet$N.args") >"$BED/logs/kubelet$N.log" 2>&1 </dev/null
