#!/usr/bin/env bash
# Build Centrifugo (a peer server of the fan-out benchmark, bench/fanout.py --servers ...,centrifugo)
# from Go modules (tools/centrifugo/go.mod pins the release), once, into a cache directory outside the
# clone, like scripts/build-k8s.sh does for the operator tests' control plane.
#
# Usage: scripts/build-centrifugo.sh   builds if needed; prints the binary's path on stdout
#        WSGATEWAY_CACHE=/path ...     cache root (default /var/cache/wsgateway, or
#                                      ~/.cache/wsgateway when that is not writable)
#        WSGATEWAY_GO_PARALLEL=N       go build -p (default 2)
# Progress goes to stderr; stdout carries only the binary's path. Serialised with flock: concurrent
# callers wait for one build and then reuse it. A no-op (besides a stamp) when cached.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/tools/centrifugo"
say() { echo "build-centrifugo: $*" >&2; }

# shellcheck source=scripts/gobuild.sh
source "$repo/scripts/gobuild.sh"   # GO, have, cache, modver, prune_unused

MODULE=github.com/centrifugal/centrifugo/v6
VERSION="$(modver "$MODULE")"
[[ -n "$VERSION" ]] || { say "cannot read the version of $MODULE from $src/go.mod"; exit 1; }

# RECIPE names the build flags below: change it when they change, so the cache key does.
RECIPE="trimpath-w-cgo0-1"  # symbols kept (no -s): perf names Go functions
key="$(cd "$src" && { cat go.mod go.sum; echo "$RECIPE"; } | sha256sum | cut -c1-12)"
dest="$cache/centrifugo-$VERSION-$key"
binary="$dest/bin/centrifugo"

if [[ -x "$binary" ]]; then
  touch "$dest/last-used" 2>/dev/null || true
  echo "$binary"
  exit 0
fi

exec 9>"$cache/centrifugo.lock"
if ! flock -n 9; then
  say "another build holds $cache/centrifugo.lock; waiting for it"
  flock 9
fi
if [[ -x "$binary" ]]; then  # built by the caller we waited for
  echo "$binary"
  exit 0
fi

export GOTOOLCHAIN=local GOFLAGS="-modcacherw -mod=readonly" CGO_ENABLED=0
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}" GOCACHE="${GOCACHE:-$cache/go/build}"
parallel="${WSGATEWAY_GO_PARALLEL:-2}"
say "building Centrifugo $VERSION with $("$GO" version) into $dest (Go caches: $GOMODCACHE, $GOCACHE; -p $parallel)"
work="$(mktemp -d "$cache/.centrifugo-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
start=$SECONDS
(cd "$src" && "$GO" mod download)
# The version stamp the upstream release build sets (centrifugo's Makefile / goreleaser): `centrifugo version`.
(cd "$src" && "$GO" build -p "$parallel" -trimpath \
  -ldflags "-w -X $MODULE/internal/build.Version=${VERSION#v}" -o "$work/bin/centrifugo" "$MODULE")
{ echo "centrifugo $VERSION"; echo "go $have"; echo "build seconds $((SECONDS - start))"; } >"$work/versions"
chmod 755 "$work"
touch "$work/last-used"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
say "done in $((SECONDS - start)) s: $binary"
prune_unused centrifugo "$dest"
echo "$binary"
