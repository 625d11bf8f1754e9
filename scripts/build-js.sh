#!/usr/bin/env bash
# Build the TypeScript SDK (clients/js -> clients/js/dist, `npm run build`: tsc). Run by `make test` (and
# `make run`: the live viewer loads the SDK from dist) after scripts/ensure-npm.sh installed clients/js.
# A no-op when dist is newer than every source file; serialised with flock (parallel test workers).
set -euo pipefail
js="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/clients/js"
stamp="$js/dist/.build-stamp"
fresh() {
  [[ -f "$stamp" ]] && [[ -z "$(find "$js/src" "$js/package.json" "$js/tsconfig.json" -newer "$stamp" -print -quit)" ]]
}
build() {
  fresh && return 0
  echo "build-js: npm run build in $js" >&2
  (cd "$js" && npm run --silent build)
  touch "$stamp"
}
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/wsgateway-build-js-$(printf '%s' "$js" | sha256sum | cut -c1-16).lock"
  flock 9
fi
build
