#!/usr/bin/env bash
# Lints, renders and checks the Helm chart (deploy/helm/mermin) and the Dockerfiles with the
# pytest suite in deploy/tests. Idempotent: the virtualenv in deploy/tests/.venv is made once and
# reinstalled only when deploy/tests/requirements.txt changes. Needs PyPI the first time.
#   MERMIN_AGGREGATOR_BIN=path  use this aggregator for --check-config instead of building one
#   extra arguments go to pytest (e.g. -k tempo)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

venv=deploy/tests/.venv
requirements=deploy/tests/requirements.txt
log() { printf '[chart-test] %s\n' "$*" >&2; }

if ! python3 -m venv --help >/dev/null 2>&1; then
  log "installing python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing $requirements"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" >"$stamp"
fi

if [ -z "${MERMIN_AGGREGATOR_BIN:-}" ]; then
  log "cargo build -p mermin-aggregator --locked"
  cargo build -p mermin-aggregator --locked
  export MERMIN_AGGREGATOR_BIN="$PWD/target/debug/mermin-aggregator"
fi

echo "== chart tests (deploy/tests)"
cd deploy/tests
exec "$PWD/.venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
