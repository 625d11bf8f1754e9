#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager) and helm from Go
# modules (tools/k8s/go.mod pins the versions), once, into a cache directory outside the clone.
#
# Why: the operator's tests run against a real API server (tests/operator/kube.py). Building
# Kubernetes takes minutes, so the binaries are cached per version and per content of tools/k8s
# (go.mod, go.sum, cmd/, the build recipe): a fresh clone on the same machine (CI) reuses them, a change
# of the pinned release builds a new directory next to the old one.
#
# Usage: scripts/build-k8s.sh          builds if needed; prints the bin directory on stdout
#        WSGATEWAY_CACHE=/path ...     cache root (default /var/cache/wsgateway, or
#                                      ~/.cache/wsgateway when that is not writable)
#        WSGATEWAY_GO_PARALLEL=N       go build -p (default 2: the build machine has 2 cores)
# Progress goes to stderr; stdout carries only the bin directory, so callers can capture it.
# Serialised with flock: concurrent callers wait for one build and then reuse it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/tools/k8s"
say() { echo "build-k8s: $*" >&2; }

# shellcheck source=scripts/gobuild.sh
source "$repo/scripts/gobuild.sh"   # GO, have, cache, modver, prune_unused

# Versions come from go.mod (k8s.io/kubernetes and helm are required indirectly, through `tool`).
K8S_VERSION="$(modver k8s.io/kubernetes)"
HELM_VERSION="$(modver helm.sh/helm/v4)"
ETCD_VERSION="$(modver go.etcd.io/etcd/server/v3)"
[[ -n "$K8S_VERSION" && -n "$HELM_VERSION" && -n "$ETCD_VERSION" ]] || { say "cannot read the versions from $src/go.mod"; exit 1; }

# RECIPE names the build flags below: change it when they change, so the cache key does.
RECIPE="trimpath-s-w-cgo0-stamped-2"
key="$(cd "$src" && { cat go.mod go.sum $(find cmd -type f | LC_ALL=C sort); echo "$RECIPE"; } | sha256sum | cut -c1-12)"
dest="$cache/k8s-$K8S_VERSION-$key"
BINARIES=(etcd kube-apiserver kube-controller-manager helm)

is_built() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$dest/bin/$b" ]] || return 1; done
  [[ -f "$dest/versions" ]]
}

if is_built; then
  touch "$dest/last-used" 2>/dev/null || true   # for the clean-up of unused versions below
  echo "$dest/bin"
  exit 0
fi

exec 9>"$cache/k8s.lock"
if ! flock -n 9; then
  say "another build holds $cache/k8s.lock; waiting for it"
  flock 9
fi
if is_built; then            # built by the caller we waited for
  echo "$dest/bin"
  exit 0
fi

export GOTOOLCHAIN=local GOFLAGS="-modcacherw -mod=readonly" CGO_ENABLED=0
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}" GOCACHE="${GOCACHE:-$cache/go/build}"
parallel="${WSGATEWAY_GO_PARALLEL:-2}"
say "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager), etcd $ETCD_VERSION and helm $HELM_VERSION"
say "with $("$GO" version) into $dest (Go caches: $GOMODCACHE, $GOCACHE; -p $parallel)"
say "a cold build downloads about 1 GiB of modules and takes several minutes; later runs reuse it"

work="$(mktemp -d "$cache/.k8s-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
start=$SECONDS
(cd "$src" && "$GO" mod download)
say "modules downloaded ($((SECONDS - start)) s)"

# The version stamps the upstream release builds set (hack/lib/version.sh, helm's Makefile): the API
# server reports them at /version, and helm checks the chart's kubeVersion against that.
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
kv=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kv+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
build() {  # name package [extra ldflags]
  local t=$SECONDS
  say "go build $2"
  (cd "$src" && "$GO" build -p "$parallel" -trimpath -ldflags "-s -w ${3:-}" -o "$work/bin/$1" "$2")
  say "built $1 ($((SECONDS - t)) s, $(du -h "$work/bin/$1" | cut -f1))"
}
build etcd ./cmd/etcd
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
build helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

{
  echo "kubernetes $K8S_VERSION"
  echo "etcd $ETCD_VERSION"
  echo "helm $HELM_VERSION"
  echo "go $have"
  echo "build seconds $((SECONDS - start))"
} >"$work/versions"
chmod 755 "$work"            # mktemp made it private; other users and CI may run the binaries
touch "$work/last-used"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
say "done in $((SECONDS - start)) s: $dest/bin"
# Other pins (older clones, branches) keep their builds until they were unused for 30 days.
prune_unused k8s "$dest"
echo "$dest/bin"
