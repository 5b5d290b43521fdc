#!/bin/sh
# First start: initdb into $PGDATA with POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256 over
# TCP), create POSTGRES_DB. Every start: run the server on 0.0.0.0:5432, socket in /tmp.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (from a Secret)}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  umask 077
  pwfile="$(mktemp /tmp/pw.XXXXXX)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "host all all ::/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\"" \
    | postgres --single -D "$PGDATA" -c unix_socket_directories=/tmp template1 >/dev/null
  echo "initialized $PGDATA (database $POSTGRES_DB)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
