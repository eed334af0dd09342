#!/usr/bin/env bash
# Stop everything start.sh started and leave nothing behind: pods first (so the kubelets tear down
# sandboxes, network namespaces and volume mounts), then every process by its recorded pid, then any
# mount under $BED, the kubelets' cgroups and the /etc/hosts line.
#   BED=<state folder> tests/cluster/bed/stop.sh
set -u
: "${BED:?set BED to the bed state folder}"
HERE=$(cd "$(dirname "$0")" && pwd)
BED=$(cd "$BED" 2>/dev/null && pwd) || exit 0
P=$BED/pki
if curl -sf --cacert "$P/ca.crt" https://127.0.0.1:6443/readyz >/dev/null 2>&1; then
  ADMIN_TOKEN=$(awk -F, '$2=="admin"{print $1}' "$P/tokens.csv")
  python3 - "$P/ca.crt" "$ADMIN_TOKEN" <<'PY'
import json, ssl, sys, time, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
def call(method, path):
    req = urllib.request.Request("https://127.0.0.1:6443" + path, method=method,
                                 headers={"Authorization": "Bearer " + sys.argv[2]})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        return json.load(resp)
pods = lambda: call("GET", "/api/v1/pods")["items"]
for pod in pods():
    m = pod["metadata"]
    call("DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}?gracePeriodSeconds=1")
deadline = time.time() + 120
while pods() and time.time() < deadline:
    time.sleep(1)
PY
fi
stop_pid() { # name: SIGTERM, then SIGKILL after 10 s
  local f=$BED/pids/$1.pid p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null
  fi
  rm -f "$f"
}
stop_pid kubelet2
stop_pid kubelet1
for n in 2 1; do # a container still running (its pod was not deleted): kill and remove it
  S=$BED/containerd$n/containerd.sock
  [ -S "$S" ] || continue
  for t in $(ctr -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr -a "$S" -n k8s.io tasks kill -a -s SIGKILL "$t" 2>/dev/null
    sleep 0.5
    ctr -a "$S" -n k8s.io tasks delete "$t" >/dev/null 2>&1
  done
done
for name in containerd2 containerd1 controller-manager scheduler apiserver etcd; do stop_pid "$name"; done
mount | awk -v b="$BED/" 'index($3, b) == 1 {print $3}' | sort -r | xargs -r -n1 umount
"$HERE/cgroups.sh" rm bed-node1
"$HERE/cgroups.sh" rm bed-node2
if grep -qx '127.0.0.2 k8sbed-node2' /etc/hosts; then
  grep -vx '127.0.0.2 k8sbed-node2' /etc/hosts >"$BED/hosts.tmp"
  cat "$BED/hosts.tmp" >/etc/hosts
  rm "$BED/hosts.tmp"
fi
rm -rf "$BED/etcd-data" # the next start is a fresh cluster
left=$(mount | grep -cF "$BED/")
echo "bed stopped; $left mounts left under $BED"
