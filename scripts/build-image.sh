#!/usr/bin/env bash
# Build the wsgateway container image (`make image`) with Debian's buildah, from the Containerfile.
#
# Why a script: these machines have buildah (chroot isolation) but no container registry, and `make
# test` builds the image on every run, so the build must be fast when nothing changed and must not
# need a registry when nothing is cached.
#
# - Tag: wsgateway/wsgateway:<version of pyproject.toml> (override with IMAGE=...), the name the
#   Helm chart's values and operator/samples use.
# - Cache: the key is the sha256 of the build's inputs (Containerfile, .containerignore,
#   pyproject.toml, README.md, LICENSE, gateway/, operator/wsgateway_operator/, this script and the
#   base image's id). A successful build is labelled org.wsgateway.inputs=<hash> and also tagged
#   <image>-inputs-<hash prefix>; when that tag exists, the build is skipped (the image re-tagged if
#   needed). Otherwise buildah builds with --layers, so a change of the sources reuses the apt and
#   dependency layers.
# - Base image: `--pull=never`. When debian:bookworm-slim is not in local storage, it is made from
#   Debian's packages with `debootstrap --variant=minbase bookworm`, trimmed like the official slim
#   image (no docs, man pages, locales or apt lists) and imported under that name; the script says so.
# - Serialised with flock: concurrent callers wait for one build and then reuse it.
#
# Usage: scripts/build-image.sh             build if needed; prints the image name on stdout
#        scripts/build-image.sh --rebuild   build even when a labelled image exists (buildah's layer
#                                           cache still applies)
#        scripts/build-image.sh --no-cache  build every layer afresh (implies --rebuild)
#        IMAGE=name:tag scripts/build-image.sh
# Progress goes to stderr; stdout carries only the image name, so callers can capture it.
set -euo pipefail

rebuild="" no_cache=""
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    --no-cache) rebuild=1 no_cache=1 ;;
    *) echo "usage: $0 [--rebuild] [--no-cache]" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { echo "build-image: $*" >&2; }

scripts/ensure-apt.sh buildah=buildah debootstrap=debootstrap

PYTHON="${PYTHON:-python3}"
VERSION="$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
IMAGE="${IMAGE:-wsgateway/wsgateway:$VERSION}"
BASE="debian:bookworm-slim"
BASE_REF="docker.io/library/$BASE"   # what a pull of the short name would store
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$REVISION" != unknown ]] && [[ -n "$(git status --porcelain -- Containerfile pyproject.toml README.md LICENSE gateway operator/wsgateway_operator 2>/dev/null)" ]]; then
  REVISION="$REVISION-dirty"
fi

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }

make_base() {
  # debian:bookworm-slim from Debian's packages: debootstrap minbase, trimmed like the official slim
  # image (its /etc/dpkg/dpkg.cfg.d/docker excludes docs, man pages and locales from later installs).
  say "$BASE is not in local storage and no registry is reachable: making it with debootstrap --variant=minbase bookworm from $MIRROR"
  local root tarball ctr
  root="$(mktemp -d /var/tmp/wsgateway-rootfs-XXXXXX)"
  tarball="$root.tar"
  cleanup_paths+=("$root" "$tarball")
  debootstrap --variant=minbase --arch="$(dpkg --print-architecture)" bookworm "$root" "$MIRROR" >/tmp/wsgateway-debootstrap.log 2>&1 || {
    tail -n 20 /tmp/wsgateway-debootstrap.log >&2; say "debootstrap failed (log: /tmp/wsgateway-debootstrap.log)"; return 1; }
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# as in the official debian:*-slim images: no documentation, man pages or translations
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$MIRROR" "$MIRROR" >"$root/etc/apt/sources.list"
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,info,groff,lintian,linda}/* "$root"/usr/share/locale/* \
    "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/* \
    "$root"/tmp/* "$root"/root/.cache 2>/dev/null || true
  : >"$root/etc/machine-id"
  tar -C "$root" --numeric-owner -cf "$tarball" .
  ctr="$(buildah from --pull=never scratch)"
  buildah add --quiet "$ctr" "$tarball" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash \
    --label org.wsgateway.base="debootstrap --variant=minbase bookworm $MIRROR" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null
  say "imported $BASE ($(buildah images --format '{{.Size}}' "$BASE_REF" | head -1))"
}

build() {
  local base_id inputs hash existing
  base_id="$(image_id "$BASE_REF" || true)"
  if [[ -z "$base_id" ]]; then
    make_base
    base_id="$(image_id "$BASE_REF")"
  fi
  inputs=(Containerfile .containerignore pyproject.toml setup.py README.md LICENSE scripts/build-image.sh)
  hash="$({
    echo "base $base_id version $VERSION"
    find "${inputs[@]}" gateway operator/wsgateway_operator -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' -not -name '*.so' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-64)"
  # The cache key is a tag, set only after a build succeeded: <image>-inputs-<hash> (labels are no key:
  # buildah copies --label values onto the intermediate images of a build, failed ones included).
  local key="$IMAGE-inputs-${hash:0:16}" existing
  if [[ -z "$rebuild" ]] && existing="$(image_id "$key")" && [[ -n "$existing" ]]; then
    buildah tag "$key" "$IMAGE"
    say "$IMAGE is up to date (inputs $hash, image ${existing:0:12}): build skipped"
    return 0
  fi
  local flags=(--isolation chroot --pull=never --network host --layers --format oci)
  [[ -n "$no_cache" ]] && flags+=(--no-cache)
  # pip in the build stage trusts what the host trusts (a TLS-intercepting proxy's CA, for one): the
  # host's bundle is mounted for the RUN steps only, never copied into a layer.
  local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  if [[ -f "$ca" ]]; then
    flags+=(--volume "$ca:/run/wsgateway-build-ca.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/wsgateway-build-ca.crt)
  fi
  local log=/tmp/wsgateway-build-image.log t0=$SECONDS
  say "building $IMAGE (inputs $hash; buildah's output: $log)"
  if ! buildah bud "${flags[@]}" \
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
    --label "org.opencontainers.image.version=$VERSION" --label "org.opencontainers.image.revision=$REVISION" \
    --label "org.wsgateway.inputs=$hash" \
    -f Containerfile -t "$IMAGE" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "the build failed (the whole output: $log)"
    return 1
  fi
  # Older cache keys of this image go (their images, once untagged, are no longer kept), then the new one.
  local old
  for old in $(buildah images --noheading --format '{{.Name}}:{{.Tag}}' | grep -F "${IMAGE#*/}-inputs-" || true); do
    [[ "$old" == *"$key" ]] || buildah rmi "$old" >/dev/null 2>&1 || true
  done
  buildah tag "$IMAGE" "$key"
  say "built $IMAGE in $((SECONDS - t0)) s ($(buildah images --format '{{.Size}}' "$IMAGE" | head -1))"
}

cleanup_paths=()
cleanup() { [[ ${#cleanup_paths[@]} -eq 0 ]] || rm -rf "${cleanup_paths[@]}"; }
trap cleanup EXIT

lock=/tmp/wsgateway-build-image.lock  # one path for every caller (XDG_RUNTIME_DIR differs between sessions)
exec 9>"$lock"
flock 9
build
echo "$IMAGE"
