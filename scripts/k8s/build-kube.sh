#!/usr/bin/env bash
# build-kube.sh OUT_DIR -> OUT_DIR/bin/{kube-apiserver,kube-controller-manager}, and etcd installed
#
# The tests under tests/k8s run a REAL Kubernetes control plane (v1.20.2). This builds it offline
# from Debian bookworm's "kubernetes" source package, fetched with apt's ordinary client
# (apt-get source). Idempotent: when the binaries are already in OUT_DIR it only makes sure etcd
# is installed, so CI keeps OUT_DIR outside the repository and builds once.
# Cold build: about 4-5 minutes on 2 cores, 1.9 GB scratch (removed afterwards, the binaries are
# about 200 MB; set KEEP_BUILD_TREE=1 to keep the sources and Go cache). Needs root (apt-get).
set -euo pipefail
OUT="${1:?usage: build-kube.sh OUT_DIR}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v etcd >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi
if [ -x "$OUT/bin/kube-apiserver" ] && [ -x "$OUT/bin/kube-controller-manager" ]; then
  echo "kube binaries already built in $OUT/bin"; exit 0
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends golang-go etcd-server etcd-client \
  golang-github-modern-go-reflect2-dev rsync make openssl curl dpkg-dev >/dev/null

# Source package: enable deb-src for this one download, then put the sources list back.
cd "$OUT"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  SRCLIST=/etc/apt/sources.list.d/debian.sources
  cp "$SRCLIST" "$OUT/debian.sources.orig"
  trap '$SUDO cp "$OUT/debian.sources.orig" "$SRCLIST"' EXIT
  $SUDO sed -i 's/^Types: deb$/Types: deb deb-src/' "$SRCLIST"
  $SUDO apt-get update -qq
  apt-get source --download-only kubernetes >/dev/null 2>&1
  $SUDO cp "$OUT/debian.sources.orig" "$SRCLIST"; trap - EXIT
  $SUDO apt-get update -qq
fi
ORIG=$(ls kubernetes_*.orig.tar.gz | head -1)
SRC="$OUT/src/kubernetes-1.20.2"
if [ ! -d "$SRC" ]; then
  mkdir -p "$OUT/src"; tar xzf "$ORIG" -C "$OUT/src"
  # The vendored modern-go/reflect2 v1.0.1 segfaults under Go >= 1.18; Debian's 1.0.2 is API-compatible.
  rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC/vendor/github.com/modern-go/reflect2"
  rm -f "$SRC/vendor/github.com/modern-go/reflect2/go.mod"
fi
# Kubernetes 1.20 builds in GOPATH mode, as its own Makefile does.
export GOPATH="$OUT/gopath" GOCACHE="$OUT/gocache" CGO_ENABLED=0 GO111MODULE=off GOPROXY=off HOME="$OUT/home"
mkdir -p "$HOME" "$GOPATH/src/k8s.io" "$OUT/bin"
[ -L "$GOPATH/src/k8s.io/kubernetes" ] || ln -s "$SRC" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
# zz_generated.openapi.go is not in the tarball; generate it the way upstream's make does.
[ -f pkg/generated/openapi/zz_generated.openapi.go ] || make gen_openapi >/dev/null
LDF="-s -w"
for V in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  LDF="$LDF -X $V.gitVersion=v1.20.2 -X $V.gitMajor=1 -X $V.gitMinor=20 -X $V.gitTreeState=clean"
done
# Build into a temporary name and move into place, so a cut build never looks complete.
for c in kube-apiserver kube-controller-manager; do
  go build -trimpath -ldflags "$LDF" -o "$OUT/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c"
  mv "$OUT/bin/$c.tmp" "$OUT/bin/$c"
done
"$OUT/bin/kube-apiserver" --version
cd "$OUT"
if [ "${KEEP_BUILD_TREE:-0}" != 1 ]; then
  chmod -R u+w "$OUT/gopath" "$OUT/gocache" 2>/dev/null || true
  rm -rf "$OUT/src" "$OUT/gopath" "$OUT/gocache" "$OUT/home"
fi
