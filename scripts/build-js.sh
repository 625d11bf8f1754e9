#!/usr/bin/env bash
# Build the TypeScript SDK (clients/js -> clients/js/dist, `npm run build`: tsc). Run by `make test` (`make js`)
# and the tests after scripts/ensure-npm.sh installed clients/js; `make schemas` copies the build into
# gateway/static/sdk for the live viewer (so `make run` needs no Node).
# A no-op when the last build is newer than every source file; serialised with flock (parallel test workers).
set -euo pipefail
js="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/clients/js"
stamp="$js/node_modules/.wsgateway-build-stamp" # not in dist/: npm pack ships dist/
fresh() {
  [[ -f "$stamp" ]] && [[ -z "$(find "$js/src" "$js/package.json" "$js/tsconfig.json" -newer "$stamp" -print -quit)" ]]
}
build() {
  fresh && return 0
  echo "build-js: npm run build in $js" >&2
  rm -rf "$js/dist" # a clean build: no module the sources no longer have
  (cd "$js" && npm run --silent build)
  touch "$stamp"
}
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/wsgateway-build-js-$(printf '%s' "$js" | sha256sum | cut -c1-16).lock"
  flock 9
fi
build
