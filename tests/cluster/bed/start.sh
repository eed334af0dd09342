#!/usr/bin/env bash
# Start the cluster tier's Kubernetes bed: etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
# and two nodes (each its own containerd and kubelet), every process on loopback only.
#
#   BED=<state folder> [IMAGES="ref ..."] tests/cluster/bed/start.sh     (root)
#   BED=<state folder> tests/cluster/bed/stop.sh                          stops all of it
#
# The two nodes look like a GKE cluster's GPU pools, so the real scheduler decides placement:
#   localhost     the on-demand GPU pool (cloud.google.com/gke-nodepool=on-demand), also the CPU stages'
#   k8sbed-node2  the spot GPU pool (cloud.google.com/gke-spot=true), tainted like GKE taints spot and
#                 GPU nodes (cloud.google.com/gke-spot=true:NoSchedule, nvidia.com/gpu=present:NoSchedule)
# Each advertises two `nvidia.com/gpu` (a node status patch; there is no device plugin), like a
# two-L4 machine: GPU requests are scheduled for real, and the stages then run on CPU. Pods have no network (a CNI plugin that only reports the pod's loopback address); the
# artifact root reaches them as a volume. IMAGES are imported into both nodes' containerd.
# Every process is started with setsid; its pid is in $BED/pids, its log in $BED/logs.
set -euo pipefail
: "${BED:?set BED to the bed state folder}"
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$("$HERE/build.sh")
start=$SECONDS
mkdir -p "$BED"/{logs,pids,cfg,node1,node2,cni/bin,cni/net.d,img}
BED=$(cd "$BED" && pwd)
[ -f "$BED/pki/ca.crt" ] || BED="$BED" "$HERE/pki.sh" >"$BED/logs/pki.log" 2>&1
P=$BED/pki
ADMIN_TOKEN=$(awk -F, '$2=="admin"{print $1}' "$P/tokens.csv")
api() { curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$@"; }

# ---- configuration files
for n in 1 2; do
  mkdir -p "$BED/containerd$n"
  sed -e "s|@BED@|$BED|g" -e "s|@CDIR@|containerd$n|g" "$HERE/containerd-config.toml.tmpl" >"$BED/containerd$n/config.toml"
done
render_kubelet() { # n addr port healthz-port
  sed -e "s#@BED@#$BED#g" -e "s#@N@#$1#g" -e "s#@ADDR@#$2#g" -e "s#@PORT@#$3#g" -e "s#@HPORT@#$4#g" \
    "$HERE/kubelet-config.yaml.tmpl" >"$BED/node$1/kubelet-config.yaml"
}
render_kubelet 1 127.0.0.1 10250 10248
render_kubelet 2 127.0.0.2 10350 10348
cp "$HERE/cni/lo-eth0" "$BED/cni/bin/"
ln -sf /usr/lib/cni/loopback "$BED/cni/bin/loopback"
cp "$HERE/cni/10-lo-eth0.conflist" "$BED/cni/net.d/"
cat >"$BED/cfg/apiserver.args" <<A
--etcd-servers=http://127.0.0.1:2379 --bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1
--tls-cert-file=$P/apiserver.crt --tls-private-key-file=$P/apiserver.key --client-ca-file=$P/ca.crt --token-auth-file=$P/tokens.csv
--service-account-key-file=$P/sa.pub --service-account-signing-key-file=$P/sa.key --service-account-issuer=https://kubernetes.default.svc
--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction,ResourceQuota,LimitRanger,Priority
--allow-privileged=false --kubelet-client-certificate=$P/apiserver-kubelet-client.crt
--kubelet-client-key=$P/apiserver-kubelet-client.key --kubelet-preferred-address-types=Hostname
--service-cluster-ip-range=10.0.0.0/24 --profiling=false
A
echo "--kubeconfig=$BED/kubeconfig-scheduler --authentication-kubeconfig=$BED/kubeconfig-scheduler --authorization-kubeconfig=$BED/kubeconfig-scheduler --bind-address=127.0.0.1 --port=0 --secure-port=10259 --leader-elect=false" >"$BED/cfg/scheduler.args"
echo "--kubeconfig=$BED/kubeconfig-controller-manager --authentication-kubeconfig=$BED/kubeconfig-controller-manager --authorization-kubeconfig=$BED/kubeconfig-controller-manager --bind-address=127.0.0.1 --port=0 --secure-port=10257 --leader-elect=false --service-account-private-key-file=$P/sa.key --root-ca-file=$P/ca.crt --use-service-account-credentials=true --controllers=*,-nodeipam" >"$BED/cfg/controller-manager.args"
kubelet_args() { # n hostname labels taints
  echo "--kubeconfig=$BED/kubeconfig-kubelet$1 --config=$BED/node$1/kubelet-config.yaml --container-runtime=remote" \
    "--container-runtime-endpoint=unix://$BED/containerd$1/containerd.sock --hostname-override=$2" \
    "--root-dir=$BED/node$1/root --cert-dir=$BED/node$1/pki --node-labels=$3 ${4:+--register-with-taints=$4} --v=1"
}
ACCEL=cloud.google.com/gke-accelerator=nvidia-l4
kubelet_args 1 localhost "cloud.google.com/gke-nodepool=on-demand,$ACCEL" >"$BED/cfg/kubelet1.args"
kubelet_args 2 k8sbed-node2 "cloud.google.com/gke-nodepool=spot,cloud.google.com/gke-spot=true,$ACCEL" \
  "cloud.google.com/gke-spot=true:NoSchedule,nvidia.com/gpu=present:NoSchedule" >"$BED/cfg/kubelet2.args"

# ---- helpers
wait_for() { # what command...
  local what=$1 i
  shift
  for i in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then echo "$what ready ($((SECONDS - start)) s)"; return 0; fi
    sleep 1
  done
  echo "$what not ready after 120 s; logs in $BED/logs" >&2
  return 1
}
launch() { # name command...
  local name=$1
  shift
  nohup setsid "$@" >"$BED/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$BED/pids/$name.pid"
}
node_ready() { api "https://127.0.0.1:6443/api/v1/nodes/$1" | python3 -c '
import json, sys
conditions = json.load(sys.stdin)["status"].get("conditions", [])
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else 1)'; }

# ---- control plane
launch etcd "$BIN/etcd/etcd" --name bed --data-dir "$BED/etcd-data" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster bed=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
wait_for etcd sh -c 'curl -s http://127.0.0.1:2379/health | grep -q "\"health\":\"true\""'
# shellcheck disable=SC2046
launch apiserver "$BIN/bin/kube-apiserver" $(cat "$BED/cfg/apiserver.args")
wait_for kube-apiserver sh -c "curl -s --cacert $P/ca.crt https://127.0.0.1:6443/readyz | grep -qx ok"
# shellcheck disable=SC2046
launch scheduler "$BIN/bin/kube-scheduler" $(cat "$BED/cfg/scheduler.args")
wait_for kube-scheduler curl -skf https://127.0.0.1:10259/healthz
set -f # the controller list holds a '*'
# shellcheck disable=SC2046
launch controller-manager "$BIN/bin/kube-controller-manager" $(cat "$BED/cfg/controller-manager.args")
set +f
wait_for kube-controller-manager curl -skf https://127.0.0.1:10257/healthz

# ---- images of the bed itself, built once: the pod sandbox (catatonit as pid 1), the XCom sidecar
local_image() { # tag dockerfile binary
  [ -x "$3" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq catatonit busybox-static >/dev/null
  if ! docker image inspect "$1" >/dev/null 2>&1; then
    rm -rf "$BED/img/$2" && mkdir -p "$BED/img/$2"
    cp "$3" "$HERE/$2" "$HERE/pgrep" "$BED/img/$2/"
    docker build -q -t "$1" -f "$BED/img/$2/$2" "$BED/img/$2" >/dev/null
  fi
}
local_image localhost/pause:catatonit Dockerfile.pause /usr/bin/catatonit
local_image localhost/xcom-sidecar:busybox Dockerfile.sidecar /bin/busybox

# ---- nodes: containerd + kubelet each, in a private mount namespace of their own (start-node.sh)
"$HERE/cgroups.sh" mk bed-node1
"$HERE/cgroups.sh" mk bed-node2
getent hosts k8sbed-node2 | grep -q '^127\.0\.0\.2' || echo "127.0.0.2 k8sbed-node2" >>/etc/hosts
for n in 1 2; do
  BED="$BED" BIN="$BIN" nohup setsid unshare --mount --propagation private "$HERE/start-node.sh" $n \
    >"$BED/logs/node$n-start.log" 2>&1 </dev/null &
  echo $! >"$BED/pids/kubelet$n.pid"
done
for n in 1 2; do
  wait_for "containerd $n" ctr -a "$BED/containerd$n/containerd.sock" version
done
# shellcheck disable=SC2086
BED=$BED "$HERE/import-images.sh" localhost/pause:catatonit localhost/xcom-sidecar:busybox ${IMAGES:-}
echo "images imported into both nodes ($((SECONDS - start)) s): ${IMAGES:-}"
wait_for "node localhost" node_ready localhost
wait_for "node k8sbed-node2" node_ready k8sbed-node2
for node in localhost k8sbed-node2; do
  api -X PATCH -H 'Content-Type: application/json-patch+json' \
    -d '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"2"}]' \
    "https://127.0.0.1:6443/api/v1/nodes/$node/status" >/dev/null
done
gpus_allocatable() { api https://127.0.0.1:6443/api/v1/nodes | python3 -c '
import json, sys
nodes = json.load(sys.stdin)["items"]
sys.exit(0 if all(n["status"]["allocatable"].get("nvidia.com/gpu") == "2" for n in nodes) else 1)'; }
wait_for "nvidia.com/gpu on both nodes" gpus_allocatable
echo "bed up in $((SECONDS - start)) s; KUBECONFIG=$BED/kubeconfig-admin"
