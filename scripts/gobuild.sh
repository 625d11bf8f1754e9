# Shared by the scripts that build tools from Go modules into a cache outside the clone
# (scripts/build-k8s.sh, scripts/build-centrifugo.sh). Source it after setting `src` (the Go module's
# directory) and defining `say`; it sets:
#   GO     the Go toolchain (on PATH or /usr/local/go/bin/go), checked against the go line of $src/go.mod
#   have   its version (e.g. 1.26.8)
#   cache  the cache root: $WSGATEWAY_CACHE, default /var/cache/wsgateway, or ~/.cache/wsgateway when
#          that is not writable
# and defines:
#   modver MODULE            the version of MODULE required in $src/go.mod
#   prune_unused PREFIX KEEP  remove $cache/PREFIX-*/ builds other than KEEP unused for 30 days

GO="$(command -v go || true)"
[[ -z "$GO" && -x /usr/local/go/bin/go ]] && GO=/usr/local/go/bin/go
need="$(awk '$1=="go"{print $2}' "$src/go.mod")"
if [[ -z "$GO" ]]; then
  say "the Go toolchain is missing (need go $need or newer on PATH or at /usr/local/go/bin/go)"
  exit 1
fi
have="$("$GO" env GOVERSION)"; have="${have#go}"
if [[ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]]; then
  say "$GO is go $have; ${src#"$repo"/}/go.mod needs go $need or newer"
  exit 1
fi

modver() { awk -v m="$1" '$1=="require"{$1=""; $0=$0} $1==m{print $2; exit}' "$src/go.mod"; }

cache="${WSGATEWAY_CACHE:-/var/cache/wsgateway}"
if ! mkdir -p "$cache" 2>/dev/null || [[ ! -w "$cache" ]]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/wsgateway"
  mkdir -p "$cache"
fi

prune_unused() {
  local old
  for old in "$cache/$1"-*/; do
    old="${old%/}"
    if [[ "$old" != "$2" && -f "$old/last-used" && -n "$(find "$old/last-used" -mtime +30)" ]]; then
      say "removing $old (unused for 30 days)"
      rm -rf "$old"
    fi
  done
}
