#!/usr/bin/env bash
# Install the npm packages the project needs: tools/package.json into tools/node_modules (test tools) and
# clients/js/package.json into clients/js/node_modules (the TypeScript SDK's build and test dependencies).
#
# Why a script: the test-suite runs a real OpenID provider (npm `oidc-provider`) and every entry
# point (make, CI, the pytest helper) needs the same idempotent, fast "install if missing or stale"
# step. Never installs anything globally.
#
# - `npm ci` when tools/package-lock.json exists (exact, reproducible), else `npm install`.
# - Fast no-op when already installed: a stamp in node_modules records the hash of package.json and
#   package-lock.json; a changed manifest or lock (stale install) triggers a reinstall.
# - Serialised with flock so concurrent callers (parallel test workers) do not race.
# - Works offline when the npm cache already holds the packages (--prefer-offline).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

manifest_hash() {
  cat "$1/package.json" "$1/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1
}

is_current() {
  local stamp="$1/node_modules/.wsgateway-install-stamp"
  [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$(manifest_hash "$1")" ]]
}

install() {
  # Re-check under the lock: another caller may have finished the install meanwhile.
  if is_current "$1"; then
    return 0
  fi
  local flags=(--prefix "$1" --no-audit --no-fund --prefer-offline --loglevel=error)
  if [[ -f "$1/package-lock.json" ]]; then
    echo "ensure-npm: npm ci in $1" >&2
    npm ci "${flags[@]}"
  else
    echo "ensure-npm: npm install in $1 (no lock file yet)" >&2
    npm install "${flags[@]}"
  fi
  manifest_hash "$1" >"$1/node_modules/.wsgateway-install-stamp"
}

for dir in "$repo/tools" "$repo/clients/js"; do
  if is_current "$dir"; then
    continue
  fi
  command -v npm >/dev/null 2>&1 || { echo "ensure-npm: npm not found (install Node.js 20+ and npm)" >&2; exit 1; }
  mkdir -p "$dir"
  (
    if command -v flock >/dev/null 2>&1; then
      # Outside the repo (nothing to commit or ignore) and outside node_modules (npm ci deletes it).
      exec 9>"${TMPDIR:-/tmp}/wsgateway-ensure-npm-$(printf '%s' "$dir" | sha256sum | cut -c1-16).lock"
      flock 9
    fi
    install "$dir"
  )
done
