#!/usr/bin/env bash
# decant's main job, end to end on this machine: a live database migrated
# with no downtime, then proven equal.
#
#   1. installs what it needs (scripts/setup.sh: PostgreSQL 15, build tools,
#      the decant extension and binary),
#   2. starts two throwaway PostgreSQL clusters, a source and a destination,
#   3. loads a sample database into the source (schemas shop, hr and ops with
#      every kind of object, about 780,000 rows, TOASTed documents, a table
#      without a key),
#   4. starts a write load on the source (pgbench running scripts/demo/load.sql),
#   5. runs `decant migrate` with types schema + full + incremental: schema,
#      full copy with progress, post-data, then the change stream, during
#      which the source's schema changes (ALTER TABLE ADD COLUMN, CREATE
#      TABLE: captured by the decant extension and applied in order),
#   6. waits until the lag is near zero, stops the load, and
#   7. runs `decant verify`: row counts and checksums of every table, source
#      against destination. The demo exits non-zero if any table differs.
#
# Run as root. Idempotent: each run starts from new clusters (in
# DEMO_DIR, default /var/tmp/decant-demo); set DEMO_KEEP=1 to leave them
# running afterwards. DEMO_LOAD_SECONDS (default 20) is how long the load
# runs after the migration reached the stream.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DEMO_DIR=${DEMO_DIR:-/var/tmp/decant-demo}
LOAD_SECONDS=${DEMO_LOAD_SECONDS:-20}
BINDIR=${DECANT_PG_BINDIR:-/usr/lib/postgresql/15/bin}
DECANT=$ROOT/target/release/decant

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "demo: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and runs PostgreSQL as the postgres user)"

step "Installing what the demo needs (scripts/setup.sh)"
./scripts/setup.sh

free_port() {
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}

as_postgres() { runuser -u postgres -- "$@"; }

stop_cluster() {
    [[ -f $1/data/postmaster.pid ]] && as_postgres "$BINDIR/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1 || true
}

MIGRATE_PID=
LOAD_PID=
cleanup() {
    [[ -n $LOAD_PID ]] && kill "$LOAD_PID" 2>/dev/null || true
    if [[ -n $MIGRATE_PID ]]; then
        kill -TERM "$MIGRATE_PID" 2>/dev/null || true
        wait "$MIGRATE_PID" 2>/dev/null || true
    fi
    if [[ ${DEMO_KEEP:-0} != 1 ]]; then
        stop_cluster "$DEMO_DIR/source"
        stop_cluster "$DEMO_DIR/destination"
    fi
}
trap cleanup EXIT

step "Starting two PostgreSQL clusters in $DEMO_DIR"
stop_cluster "$DEMO_DIR/source"
stop_cluster "$DEMO_DIR/destination"
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
chown postgres "$DEMO_DIR"
SRC_PORT=$(free_port 55432)
DST_PORT=$(free_port $((SRC_PORT + 1)))
for side in source destination; do
    as_postgres "$BINDIR/initdb" -A trust -U postgres -D "$DEMO_DIR/$side/data" >/dev/null
done
# The source: logical decoding, and the decant plugin allowed
# (output_plugin_libraries exists on current minor releases).
cat >>"$DEMO_DIR/source/data/postgresql.conf" <<EOF
wal_level = logical
max_wal_size = 4GB
EOF
# (grep reads all of it: with pipefail, grep -q could stop early and fail the pipeline.)
if "$BINDIR/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, decant'" >>"$DEMO_DIR/source/data/postgresql.conf"
fi
echo "max_wal_size = 4GB" >>"$DEMO_DIR/destination/data/postgresql.conf"
as_postgres "$BINDIR/pg_ctl" -D "$DEMO_DIR/source/data" -l "$DEMO_DIR/source.log" -o "-p $SRC_PORT -k $DEMO_DIR -c listen_addresses=127.0.0.1" -w start >/dev/null
as_postgres "$BINDIR/pg_ctl" -D "$DEMO_DIR/destination/data" -l "$DEMO_DIR/destination.log" -o "-p $DST_PORT -k $DEMO_DIR -c listen_addresses=127.0.0.1" -w start >/dev/null
SRC="host=127.0.0.1 port=$SRC_PORT dbname=shop user=postgres"
DST="host=127.0.0.1 port=$DST_PORT dbname=shop user=postgres"
psql -q -X -h 127.0.0.1 -p "$SRC_PORT" -U postgres -c "CREATE DATABASE shop"
psql -q -X -h 127.0.0.1 -p "$DST_PORT" -U postgres -c "CREATE DATABASE shop"
echo "source:      $SRC"
echo "destination: $DST (empty)"

step "Loading the sample database into the source"
start=$(date +%s)
psql -q -X -v ON_ERROR_STOP=1 -d "$SRC" -f scripts/demo/sample.sql >/dev/null
psql -X -d "$SRC" -c "SELECT n.nspname AS schema, count(*) FILTER (WHERE c.relkind IN ('r','p')) AS tables,
        count(*) FILTER (WHERE c.relkind IN ('v','m')) AS views, count(*) FILTER (WHERE c.relkind = 'i') AS indexes,
        pg_size_pretty(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relkind = 'r')) AS size
   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname IN ('shop', 'hr', 'ops') GROUP BY 1 ORDER BY 1"
echo "loaded in $(($(date +%s) - start)) s"

# DDL capture: the extension's event triggers put each DDL statement into
# the WAL, where the stream applies it at its place among the changes.
psql -q -X -v ON_ERROR_STOP=1 -d "$SRC" -c "CREATE EXTENSION IF NOT EXISTS decant"

cat >"$DEMO_DIR/task.toml" <<EOF
# The demo's task: see \`decant default-config\` for every setting.
task_id = "demo"

[source]
dsn = "$SRC"
slot = "decant_demo"

[destination]
dsn = "$DST"

[migrate]
types = ["schema", "full", "incremental"]
workers = 2

[agent]
metrics_listen = ""

[applier]
metrics_listen = ""
EOF

step "Starting a write load on the source (pgbench, 2 clients)"
pgbench -n -h 127.0.0.1 -p "$SRC_PORT" -U postgres -f scripts/demo/load.sql -c 2 -T 100000 shop >"$DEMO_DIR/load.log" 2>&1 &
LOAD_PID=$!
sleep 2
kill -0 "$LOAD_PID" 2>/dev/null || { cat "$DEMO_DIR/load.log"; die "the write load did not start"; }

step "decant migrate --config $DEMO_DIR/task.toml (schema, full copy, then the change stream)"
"$DECANT" migrate --config "$DEMO_DIR/task.toml" 2> >(tee "$DEMO_DIR/migrate.log" >&2) &
MIGRATE_PID=$!

status_json() { "$DECANT" status --config "$DEMO_DIR/task.toml" --json 2>/dev/null || true; }
field() { sed -n "s/.*\"$1\":\"\\{0,1\\}\\([^,\"}]*\\).*/\\1/p"; }

# Wait for the stream phase.
until [[ $(status_json | field phase) == incremental ]]; do
    kill -0 "$MIGRATE_PID" 2>/dev/null || die "decant migrate stopped; see $DEMO_DIR/migrate.log"
    sleep 1
done

step "Streaming changes while the load goes on ($LOAD_SECONDS s)"
for ((i = 0; i < LOAD_SECONDS; i += 5)); do
    sleep 5
    "$DECANT" status --config "$DEMO_DIR/task.toml" 2>/dev/null | grep -E '^(task|incremental|rates|ddl)' || true
    if ((i == 5)); then
        step "Changing the schema on the source while it streams: a new column used at once, a new table"
        psql -q -X -v ON_ERROR_STOP=1 -d "$SRC" <<'SQL'
BEGIN;
ALTER TABLE shop.customers ADD COLUMN loyalty_points int NOT NULL DEFAULT 0;
UPDATE shop.customers SET loyalty_points = 10 WHERE id % 3 = 0;
COMMIT;
CREATE TABLE shop.coupons (code text PRIMARY KEY, percent int NOT NULL CHECK (percent BETWEEN 1 AND 90),
                           customer_id bigint REFERENCES shop.customers (id));
INSERT INTO shop.coupons SELECT 'C' || g, 5 + g % 40, g FROM generate_series(1, 1000) g;
SQL
        echo "ALTER TABLE shop.customers ADD COLUMN loyalty_points; CREATE TABLE shop.coupons (1000 rows)"
    fi
done

step "Waiting until the lag is near zero (under 1 MB)"
for _ in $(seq 1 120); do
    lag=$(status_json | field lag_bytes)
    [[ -n $lag && $lag != null && $lag -lt 1048576 ]] && break
    kill -0 "$MIGRATE_PID" 2>/dev/null || die "decant migrate stopped; see $DEMO_DIR/migrate.log"
done
echo "lag: ${lag:-unknown} bytes"

step "Stopping the load"
kill "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true
LOAD_PID=
grep -E "number of transactions actually processed|tps" "$DEMO_DIR/load.log" || true

step "Verifying: every table, source against destination (after the last change is applied)"
if "$DECANT" verify --config "$DEMO_DIR/task.toml" --wait 300; then
    step "Done: the destination equals the source."
    "$DECANT" status --config "$DEMO_DIR/task.toml" | head -1
    [[ ${DEMO_KEEP:-0} == 1 ]] && echo "clusters left running (DEMO_KEEP=1): source port $SRC_PORT, destination port $DST_PORT"
    exit 0
fi
die "the destination differs from the source (see above)"
