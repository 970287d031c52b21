#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1:55432 for the tests; prints the URL to use.
# Installs Debian's server if it is missing. Stop it with: .ci/postgres.sh stop DATADIR
set -euo pipefail
if [ "${1:-}" = "stop" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  runuser -u postgres -- "$bin/pg_ctl" -D "$2" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$2"
  exit 0
fi
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=$(mktemp -d /tmp/autosqueeze-pg.XXXXXX)
chown postgres "$data"
runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/log" -w \
  -o "-c listen_addresses=127.0.0.1 -p 55432 -k $data" start >/dev/null
runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p 55432 -U postgres autosqueeze
echo "$data postgresql://postgres@127.0.0.1:55432/autosqueeze"
