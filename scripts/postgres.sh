#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on localhost, for Optuna studies shared by several workers (docs/tuning.md)
# and for the tests that exercise them.
#
#   scripts/postgres.sh start    start (or reuse) the cluster; prints its database URL on stdout
#   scripts/postgres.sh url      print the URL
#   scripts/postgres.sh status   exit 0 when the cluster is running
#   scripts/postgres.sh stop     stop it (the data folder stays; delete it to start afresh)
#
# The cluster lives in $BALLOT_PG_DIR (default ${TMPDIR:-/tmp}/ballot-postgres), listens on 127.0.0.1:$BALLOT_PG_PORT
# (default 55432) only, trusts local connections (throwaway use only) and holds one database, "optuna".
# When the PostgreSQL binaries are missing and we are root with apt-get, Debian's postgresql package is installed.
# As root the server runs as the "postgres" user (PostgreSQL refuses to run as root).
set -euo pipefail

DIR=${BALLOT_PG_DIR:-${TMPDIR:-/tmp}/ballot-postgres}
PORT=${BALLOT_PG_PORT:-55432}
USER_NAME=ballot
DB=optuna
URL="postgresql://${USER_NAME}@127.0.0.1:${PORT}/${DB}"

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir)
        if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
    return 1
}

install_postgres() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        die "PostgreSQL binaries not found and cannot be installed here (needs root and apt-get); install postgresql"
    fi
    echo "postgres.sh: installing Debian's postgresql package" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 \
        || die "apt-get install postgresql failed"
}

as_owner() {  # run a PostgreSQL tool as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { [ -n "${BIN:-}" ] && as_owner "$BIN/pg_ctl" status -D "$DIR/data" >/dev/null 2>&1; }

BIN=$(find_bindir || true)

case "${1:-}" in
    url)
        echo "$URL" ;;
    status)
        running ;;
    stop)
        if running; then as_owner "$BIN/pg_ctl" stop -D "$DIR/data" -m fast >/dev/null; fi ;;
    start)
        if [ -z "$BIN" ]; then install_postgres; BIN=$(find_bindir) || die "no initdb after installing postgresql"; fi
        mkdir -p "$DIR"
        if [ "$(id -u)" = 0 ]; then
            id postgres >/dev/null 2>&1 || die "user 'postgres' is missing (it comes with Debian's postgresql package)"
            chown postgres "$DIR"
        fi
        if [ ! -f "$DIR/data/PG_VERSION" ]; then
            as_owner "$BIN/initdb" -D "$DIR/data" -U "$USER_NAME" -A trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
                || die "initdb failed; see $DIR/initdb.log"
        fi
        if ! running; then
            as_owner "$BIN/pg_ctl" start -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
                -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" >/dev/null \
                || die "the server did not start (port $PORT taken?); see $DIR/server.log"
        fi
        if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" -d postgres -tAc \
                "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
            "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" "$DB" || die "createdb $DB failed"
        fi
        echo "$URL" ;;
    *)
        die "usage: $0 start|url|status|stop" ;;
esac
