#!/usr/bin/env bash
# Try to provide a local PostgreSQL for the service's tests; print its SQLAlchemy URL on stdout.
# Never fails the CI: any problem is reported on stderr and the script exits non-zero, and the
# Postgres tests then skip with a reason.
set -u
log() { echo "postgres: $*" >&2; }
run_as_postgres() { if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi; }

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing postgresql (Debian packages)"
    (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq postgresql) >&2 || { log "could not install postgresql"; exit 1; }
  else
    log "postgresql is not installed and cannot be installed here (not root or no apt-get)"; exit 1
  fi
fi
[ "$(id -u)" = 0 ] || { log "starting a cluster needs root (to run as the postgres user)"; exit 1; }
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
sock=/var/run/postgresql
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '{print $2}' | grep -qx main || { pg_createcluster "$ver" main >&2 || { log "pg_createcluster failed"; exit 1; }; }
  status=$(pg_lsclusters -h 2>/dev/null | awk '$2=="main"{print $4}')
  if [ "$status" != "online" ]; then
    pg_ctlcluster "$ver" main start >&2 || { log "pg_ctlcluster start failed"; exit 1; }
  fi
  port=$(pg_lsclusters -h 2>/dev/null | awk '$2=="main"{print $3}')
else
  data=/tmp/ipshield-pg; port=55432; sock=/tmp
  if [ ! -d "$data" ]; then mkdir -p "$data" && chown postgres "$data" && run_as_postgres "/usr/lib/postgresql/$ver/bin/initdb" -D "$data" -A trust >&2 || { log "initdb failed"; exit 1; }; fi
  run_as_postgres "/usr/lib/postgresql/$ver/bin/pg_ctl" -D "$data" -o "-p $port -k /tmp" -l "$data/log" -w start >&2 || { log "pg_ctl start failed"; exit 1; }
fi
for _ in $(seq 1 30); do run_as_postgres psql -p "$port" -h "$sock" -tAc "select 1" >/dev/null 2>&1 && break; sleep 1; done
psql_q() { run_as_postgres psql -p "$port" -h "$sock" -v ON_ERROR_STOP=1 -tAc "$1"; }
psql_q "select 1" >/dev/null 2>&1 || { log "the server does not answer"; exit 1; }
psql_q "select 1 from pg_roles where rolname='ipshield'" | grep -q 1 || psql_q "create role ipshield login password 'ipshield'" >/dev/null || { log "create role failed"; exit 1; }
psql_q "select 1 from pg_database where datname='ipshield_test'" | grep -q 1 || psql_q "create database ipshield_test owner ipshield" >/dev/null || { log "create database failed"; exit 1; }
echo "postgresql+psycopg://ipshield:ipshield@127.0.0.1:${port}/ipshield_test"
