#!/usr/bin/env bash
# Full-copy benchmark: `decant migrate` (schema + full) against pgcopydb clone,
# pg_dump -Fd + pg_restore, pg_dump | psql, and plain COPY pipes (the limit),
# each moving the same source database into a fresh destination database.
#
# Starts two throwaway PostgreSQL 15 clusters: a source loaded with
# pgbench -i -s SCALE plus a mixed-type table of MIXED_ROWS rows, 60% of them
# with a 3.9 kB TOASTed value (about 1.3 GB in all with the defaults), and a
# destination on which each method gets its own new database (dropped again
# after its row counts are checked). Methods run one at a time, decant first:
#
#   decant       decant migrate --config FILE ([migrate] types = schema + full,
#                workers = 2, split_tables_larger_than_mb = 100)
#   pgcopydb     pgcopydb clone --table-jobs 2 --index-jobs 2
#                --split-tables-larger-than 100MB
#   pg_dump_dir  pg_dump -Fd -j 2 -Z 0 + pg_restore -j 2 (timed together)
#   pg_dump_psql pg_dump | psql
#   copy_limit   the tables only (pre-data schema made untimed, so no indexes,
#                constraints or sequence values), moved by
#                psql -c "COPY t TO STDOUT (FORMAT binary)" | psql -c "COPY t FROM STDIN ...",
#                two pipes at a time, largest table first
#
# Every destination must hold the source's row count in every table, or the
# run fails. Index counts are shown (copy_limit builds none by design).
#
# Notes on what is measured:
#   - seconds = wall time of the method's command(s) into an empty database
#     (CREATE DATABASE, and for copy_limit the schema, are not timed).
#   - MB/s = source pg_database_size / seconds, MB = 10^6 bytes.
#   - CPU s = user + system CPU seconds of the method's own processes (decant;
#     pgcopydb with the pg_dump, pg_restore and psql it starts; pg_dump and
#     pg_restore or psql; the psql pipes), not of the servers: what the tool
#     takes from the cores the servers share. CPU s/GB divides by the size.
#   - "decant/method" = decant seconds / the method's seconds (< 1: decant is
#     faster). time_ratio_vs_pg_dump uses the faster of the two pg_dump ways.
#   - The destination runs with fsync on (what a real migration pays); the
#     source with fsync off (it is only read while timing). Autovacuum is off
#     on both; the source is vacuumed and read once before the timed runs, so
#     no method pays for hint bits or a cold cache; the COPY pipes run once,
#     untimed, into a scratch database, so no method pays for coming first
#     to a fresh destination. A CHECKPOINT on the destination precedes
#     every run.
#
# stdout: parameters, a table and, as the LAST line, one JSON object with
# time_ratio_vs_pgcopydb, time_ratio_vs_pg_dump, time_ratio_vs_copy_limit, the
# seconds of each method and the data size. Progress goes to stderr ("bench: ...").
#
# Run as root after ./scripts/setup.sh (server commands run as `postgres`).
# Environment:
#   SIZE=small          small (~1.3 GB), large (~4.3 GB) or huge (~11 GB)
#   SCALE=30            pgbench -i scale of the source (default from SIZE)
#   MIXED_ROWS=300000   rows in the mixed-type table (default from SIZE)
#   DECANT_BIN=target/release/decant
#   DECANT_PG_BINDIR=/usr/lib/postgresql/15/bin
#   SKIP_DECANT=1       leave decant out (testing the peers only; ratios are null)
#   METHODS="decant pgcopydb"  run only these methods (default: all five, in the
#                       order above); ratios against a method left out are null
set -euo pipefail

# DECANT_BIN, if relative, is relative to the caller's directory.
[[ -z ${DECANT_BIN:-} || $DECANT_BIN == /* ]] || DECANT_BIN=$PWD/$DECANT_BIN
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# SIZE picks both: small (the default, about 1.3 GB), large (about 4.3 GB),
# huge (about 11 GB); SCALE and MIXED_ROWS, when set, win.
case ${SIZE:-small} in
    small) size_scale=30 size_rows=300000 ;;
    large) size_scale=100 size_rows=1000000 ;;
    huge) size_scale=300 size_rows=2000000 ;;
    *) echo "bench: error: SIZE=${SIZE} (small, large or huge)" >&2; exit 1 ;;
esac
SCALE=${SCALE:-$size_scale}
MIXED_ROWS=${MIXED_ROWS:-$size_rows}
BINDIR=${DECANT_PG_BINDIR:-/usr/lib/postgresql/15/bin}
DECANT_BIN=${DECANT_BIN:-$PWD/target/release/decant}
SKIP_DECANT=${SKIP_DECANT:-0}
DB=bench

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (server commands are run as the postgres user via runuser)"
id postgres >/dev/null 2>&1 || die "no 'postgres' user; run ./scripts/setup.sh"
command -v python3 >/dev/null || die "python3 is required"
for bin in initdb pg_ctl postgres psql pgbench pg_dump pg_restore; do
    [[ -x $BINDIR/$bin ]] || die "$BINDIR/$bin not found (set DECANT_PG_BINDIR)"
done
PKGLIBDIR=$("$BINDIR/pg_config" --pkglibdir 2>/dev/null || echo "$BINDIR/../lib")
if [[ $SKIP_DECANT != 1 ]]; then
    [[ -x $DECANT_BIN ]] || die "$DECANT_BIN is missing; run ./scripts/setup.sh"
    [[ -f $PKGLIBDIR/decant.so ]] || die "$PKGLIBDIR/decant.so is missing; run ./scripts/setup.sh"
    # Fail now rather than after loading the source.
    "$DECANT_BIN" migrate --help >/dev/null 2>&1 \
        || die "$DECANT_BIN has no 'migrate' subcommand; rebuild it (cargo build --release -p decant-agent)"
fi
if ! command -v pgcopydb >/dev/null; then
    say "pgcopydb not found: apt-get install -y pgcopydb"
    DEBIAN_FRONTEND=noninteractive apt-get install -y pgcopydb >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y pgcopydb >&2; } \
        || die "could not install pgcopydb"
fi
# pgcopydb runs pg_dump/pg_restore from PATH: make them the PostgreSQL 15 ones.
export PATH=$BINDIR:$PATH

# --- throwaway clusters ---------------------------------------------------------
WORK=$(mktemp -d)
chown postgres: "$WORK"
started=() method_pid=
cleanup() {
    local d
    # A method still running (interrupted): its whole process group.
    if [[ -n $method_pid ]]; then
        kill -TERM -- "-$method_pid" 2>/dev/null || true
        wait "$method_pid" 2>/dev/null || true
    fi
    for d in "${started[@]}"; do
        runuser -u postgres -- "$BINDIR/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
# The postgres user may not be able to read the caller's cwd.
cd "$WORK"

read -r SRC_PORT DST_PORT < <(python3 - <<'EOF'
import socket
ports = []
for port in range(55432, 55632):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    ports.append(port)
    if len(ports) == 2:
        break
else:
    raise SystemExit("no two free ports in 55432..55631")
print(*ports)
EOF
)
[[ -n ${DST_PORT:-} ]] || die "no free ports"

start_cluster() { # name port [postgresql.conf lines on stdin]
    local name=$1 port=$2 data=$WORK/$1
    runuser -u postgres -- "$BINDIR/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$WORK/initdb-$name.log" 2>&1 || { cat "$WORK/initdb-$name.log" >&2; die "initdb ($name) failed"; }
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$WORK'"
        echo "shared_buffers = 1GB"
        echo "max_wal_size = 16GB"
        echo "checkpoint_timeout = 1h"
        echo "autovacuum = off"
        cat
    } >>"$data/postgresql.conf"
    runuser -u postgres -- "$BINDIR/pg_ctl" -D "$data" -l "$WORK/$name.log" -w start >/dev/null \
        || { tail -n 30 "$WORK/$name.log" >&2; die "server ($name) did not start"; }
    started+=("$data")
}

say "initdb in $WORK (source port $SRC_PORT, destination port $DST_PORT)"
# (a process substitution, not a pipe: start_cluster must run in this shell to
# record the cluster for cleanup)
start_cluster source "$SRC_PORT" < <(
    echo "wal_level = logical"
    echo "max_replication_slots = 10"
    echo "max_wal_senders = 10"
    # Only read while timing; fsync off just makes the load lighter.
    echo "fsync = off"
    echo "synchronous_commit = off"
    # Only some builds have this GUC; where present, every plugin must be listed.
    # (grep -q would exit early and, with pipefail, fail the pipeline via SIGPIPE)
    if "$BINDIR/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
        echo "output_plugin_libraries = 'pgoutput, test_decoding, decant'"
    fi
)
# The destination keeps fsync and synchronous_commit on: a migration pays them.
start_cluster dest "$DST_PORT" </dev/null

SRC=(-h 127.0.0.1 -p "$SRC_PORT" -U postgres)
DST=(-h 127.0.0.1 -p "$DST_PORT" -U postgres)
src_() { "$BINDIR/psql" "${SRC[@]}" -X -q -At -v ON_ERROR_STOP=1 "$@"; }
dst_() { "$BINDIR/psql" "${DST[@]}" -X -q -At -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.3f}')"; }

PG_VERSION=$(src_ -d postgres -c "SHOW server_version")
say "PostgreSQL $PG_VERSION; SCALE=$SCALE MIXED_ROWS=$MIXED_ROWS"

# --- source ------------------------------------------------------------------------
src_ -d postgres -c "CREATE DATABASE $DB"
say "pgbench -i -s $SCALE"
t0=$(now)
"$BINDIR/pgbench" "${SRC[@]}" -i -s "$SCALE" -q "$DB" >"$WORK/pgbench-init.log" 2>&1 \
    || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
say "mixed table: $MIXED_ROWS rows"
# Deterministic values (the columns of decode.sh's mixed table). 60% of the
# rows (id % 10 < 6) carry a 3900-character slice of a fixed string of md5 hex
# digits, which pglz cannot shrink: it is TOASTed out of line, uncompressed,
# in two chunks on the source and on every destination. SCALE=30 and
# MIXED_ROWS=300000 make about 0.47 GB of pgbench and 0.84 GB of mixed.
src_ -d "$DB" <<SQL
CREATE TABLE mixed (
    id bigint PRIMARY KEY, i int, b bigint, n numeric(12,2), f float8,
    t text, v varchar(40), c char(20), ts timestamptz, d date, u uuid,
    j jsonb, flag bool, big text);
INSERT INTO mixed (id, i, b, n, f, t, v, c, ts, d, u, j, flag, big)
SELECT g, g, g::bigint * 1000003,
       CASE WHEN g % 13 = 0 THEN NULL ELSE (g * 1.37)::numeric(12,2) END,
       g / 7.0::float8,
       CASE WHEN g % 7 = 0 THEN NULL ELSE 'row ' || g || ' ' || md5(g::text) END,
       left(md5(g::text), 1 + g % 40),
       'c' || (g % 1000),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       date '2024-01-01' + (g % 365),
       md5(g::text)::uuid,
       CASE WHEN g % 11 = 0 THEN NULL
            ELSE jsonb_build_object('g', g, 'tag', 'k' || (g % 7), 'arr', jsonb_build_array(g, g + 1)) END,
       g % 2 = 0,
       CASE WHEN g % 10 < 6 THEN substr(p.s, 1 + ((g::bigint * 7919) % 60000)::int, 3900)
            WHEN g % 10 IN (6, 7) THEN NULL
            ELSE 'short ' || g END
FROM generate_series(1, $MIXED_ROWS) g,
     (SELECT string_agg(md5(k::text), '' ORDER BY k) AS s FROM generate_series(1, 2200) k) p;
VACUUM ANALYZE mixed;
CHECKPOINT;
SQL
DATA_BYTES=$(src_ -d "$DB" -c "SELECT pg_database_size(current_database())")
say "source loaded in $(since "$t0") s: $(src_ -d "$DB" -c "SELECT pg_size_pretty($DATA_BYTES::bigint)")"

# The source's tables (largest first), their row counts, and queries for the checks.
mapfile -t TABLES < <(src_ -d "$DB" -c "
    SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%'
    ORDER BY pg_total_relation_size(c.oid) DESC, 1")
((${#TABLES[@]} > 0)) || die "no tables on the source"
COUNT_SQL= TABLE_LIST=
for t in "${TABLES[@]}"; do
    COUNT_SQL+="${COUNT_SQL:+ UNION ALL }SELECT '$t', count(*) FROM $t"
    TABLE_LIST+="${TABLE_LIST:+, }'$t'"
done
COUNT_SQL+=" ORDER BY 1"
INDEX_SQL="SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE format('%I.%I', n.nspname, c.relname) IN ($TABLE_LIST)"
src_ -d "$DB" -F ' ' -c "$COUNT_SQL" >"$WORK/counts.source"
SRC_INDEXES=$(src_ -d "$DB" -c "$INDEX_SQL")
say "tables: $(tr '\n' ' ' <"$WORK/counts.source")($SRC_INDEXES indexes)"

# Read everything once, untimed, so the first method does not meet a colder cache.
say "warm-up: reading every table once"
for t in "${TABLES[@]}"; do
    src_ -d "$DB" -c "COPY $t TO STDOUT (FORMAT binary)" >/dev/null
done

# --- methods -----------------------------------------------------------------------
# Each method_X takes the (new, empty) destination database name. It runs in
# the background in its own process group, so that an interrupted run can stop
# all of it (pgcopydb, pg_dump -j and xargs start workers of their own), and
# because pgcopydb, when it fails, signals its whole process group: sharing
# ours, it would kill this script, leaving the clusters running.
SRC_URI="postgres://postgres@127.0.0.1:$SRC_PORT/$DB"
dst_uri() { echo "postgres://postgres@127.0.0.1:$DST_PORT/$1"; }

method_decant() {
    local config=$WORK/decant.toml
    cat >"$config" <<TOML
task_id = "bench"
[source]
dsn = "host=127.0.0.1 port=$SRC_PORT dbname=$DB user=postgres"
slot = "decant_bench"
[destination]
dsn = "host=127.0.0.1 port=$DST_PORT dbname=$1 user=postgres"
[migrate]
types = ["schema", "full"]
workers = 2
split_tables_larger_than_mb = 100
[agent]
metrics_listen = ""
[applier]
metrics_listen = ""
TOML
    "$DECANT_BIN" migrate --config "$config"
}

method_pgcopydb() {
    # --dir: pgcopydb's work directory (schema dump, per-table state); fresh each run.
    rm -rf "$WORK/pgcopydb" &&
        pgcopydb clone --source "$SRC_URI" --target "$(dst_uri "$1")" --dir "$WORK/pgcopydb" \
            --table-jobs 2 --index-jobs 2 --split-tables-larger-than 100MB &&
        rm -rf "$WORK/pgcopydb"
}

method_pg_dump_dir() {
    rm -rf "$WORK/dump" &&
        "$BINDIR/pg_dump" "${SRC[@]}" -d "$DB" -Fd -j 2 -Z 0 -f "$WORK/dump" &&
        "$BINDIR/pg_restore" "${DST[@]}" -j 2 -d "$1" "$WORK/dump" &&
        rm -rf "$WORK/dump"
}

method_pg_dump_psql() {
    "$BINDIR/pg_dump" "${SRC[@]}" -d "$DB" \
        | "$BINDIR/psql" "${DST[@]}" -X -q -v ON_ERROR_STOP=1 -d "$1" >/dev/null
}

# One table through a binary COPY pipe (run by xargs in a child bash).
copy_table() { # table dest_db
    set -o pipefail
    "$BINDIR/psql" "${SRC[@]}" -X -q -v ON_ERROR_STOP=1 -d "$DB" -c "COPY $1 TO STDOUT (FORMAT binary)" \
        | "$BINDIR/psql" "${DST[@]}" -X -q -v ON_ERROR_STOP=1 -d "$2" -c "COPY $1 FROM STDIN (FORMAT binary)" >/dev/null
}
prepare_copy_limit() { # untimed: the tables, no indexes or constraints
    "$BINDIR/pg_dump" "${SRC[@]}" -d "$DB" --section=pre-data \
        | "$BINDIR/psql" "${DST[@]}" -X -q -v ON_ERROR_STOP=1 -d "$1" >/dev/null
}
method_copy_limit() {
    # The array does not survive export; the child rebuilds it from these.
    SRC_PORT=$SRC_PORT DST_PORT=$DST_PORT BINDIR=$BINDIR DB=$DB \
        xargs -d '\n' -P 2 -I '{}' bash -c "$(declare -f copy_table)"'
            SRC=(-h 127.0.0.1 -p "$SRC_PORT" -U postgres)
            DST=(-h 127.0.0.1 -p "$DST_PORT" -U postgres)
            copy_table "$1" "$2"' _ '{}' "$1" < <(printf '%s\n' "${TABLES[@]}")
}

read -r -a METHODS <<<"${METHODS:-decant pgcopydb pg_dump_dir pg_dump_psql copy_limit}"
for m in "${METHODS[@]}"; do
    declare -F "method_$m" >/dev/null || die "METHODS: unknown method $m"
done
if [[ $SKIP_DECANT == 1 ]]; then
    read -r -a METHODS <<<"${METHODS[*]/decant/}"
fi

# A fresh destination makes whichever method runs first slower than the
# same method run later: measured at 1.3 GB, pgcopydb, decant and the COPY
# pipes each took 4 to 6 s longer when first, even with the destination's
# WAL segments written once beforehand. So the first run is a rehearsal,
# untimed: the tables through the COPY pipes into a scratch database,
# dropped again.
say "warm-up: the COPY pipes into a scratch database, untimed"
dst_ -d postgres -c "CREATE DATABASE bench_warmup"
{ prepare_copy_limit bench_warmup && method_copy_limit bench_warmup; } >/dev/null || die "warm-up failed"
dst_ -d postgres -c "DROP DATABASE bench_warmup" -c "CHECKPOINT"

CPU_BUSY=$(python3 - <<'EOF'
import time
def sample():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait
t0, i0 = sample(); time.sleep(2); t1, i1 = sample()
print(round(100 * (1 - (i1 - i0) / max(t1 - t0, 1))))
EOF
)
if ((CPU_BUSY >= 20)); then
    say "WARNING: CPU ${CPU_BUSY}% busy before the timed runs; other work may skew timings"
fi

declare -A SECS INDEXES
results=$WORK/results.tsv
: >"$results"
for m in "${METHODS[@]}"; do
    db=dst_$m
    dst_ -d postgres -c "CREATE DATABASE $db"
    if declare -F "prepare_$m" >/dev/null; then
        "prepare_$m" "$db" || die "$m: preparing the destination failed"
    fi
    dst_ -d postgres -c "CHECKPOINT"
    say "$m: running"
    t0=$(now)
    set -m
    # `times` in the method's subshell: its second line is the CPU time of
    # every process the method started and waited for.
    ( "method_$m" "$db" && times >"$WORK/$m.times" ) >"$WORK/$m.log" 2>&1 &
    method_pid=$!
    set +m
    rc=0
    wait "$method_pid" || rc=$?
    SECS[$m]=$(since "$t0")
    method_pid=
    if ((rc != 0)); then
        tail -n 40 "$WORK/$m.log" >&2
        die "$m failed with status $rc (log above)"
    fi
    # Row counts per table must equal the source's.
    if ! dst_ -d "$db" -F ' ' -c "$COUNT_SQL" >"$WORK/counts.$m" 2>"$WORK/counts.$m.err"; then
        cat "$WORK/counts.$m.err" >&2
        die "$m: could not count the rows of the source's tables on the destination"
    fi
    if ! diff -u "$WORK/counts.source" "$WORK/counts.$m" >&2; then
        die "$m: row counts differ from the source (diff above: - source, + $m)"
    fi
    INDEXES[$m]=$(dst_ -d "$db" -c "$INDEX_SQL")
    if [[ $m != copy_limit && ${INDEXES[$m]} != "$SRC_INDEXES" ]]; then
        say "WARNING: $m: ${INDEXES[$m]} indexes on the destination, $SRC_INDEXES on the source"
    fi
    say "$m: ${SECS[$m]} s, row counts match, ${INDEXES[$m]} indexes"
    CPU=$(python3 - "$WORK/$m.times" <<'CPUEOF'
import re, sys
children = open(sys.argv[1]).read().splitlines()[1]
pairs = re.findall(r"(\d+)m([\d.]+)s", children)
print("%.2f" % sum(float(m) * 60 + float(s) for m, s in pairs))
CPUEOF
)
    say "$m: ${CPU} CPU s in its own processes"
    printf '%s\t%s\t%s\t%s\n' "$m" "${SECS[$m]}" "${INDEXES[$m]}" "$CPU" >>"$results"
    if [[ $m == decant ]]; then
        # Where decant's time went: its phase log lines.
        sed 's/\x1b\[[0-9;]*m//g' "$WORK/$m.log" | grep -E "schema dumped|copying|full copy done|post-data|phases done" \
            | sed 's/^/bench: decant: /' >&2 || true
        # Leave the source as the peers find it.
        src_ -d "$DB" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                          WHERE slot_name = 'decant_bench' AND NOT active" >/dev/null
    fi
    dst_ -d postgres -c "DROP DATABASE $db"
    dst_ -d postgres -c "CHECKPOINT"
done

# --- report ------------------------------------------------------------------------
PG_VERSION=$PG_VERSION SCALE=$SCALE MIXED_ROWS=$MIXED_ROWS DATA_BYTES=$DATA_BYTES CPU_BUSY=$CPU_BUSY \
SRC_INDEXES=$SRC_INDEXES NTABLES=${#TABLES[@]} python3 - "$results" <<'EOF'
import json, os, sys

env = os.environ
data = int(env["DATA_BYTES"])
rows = {}
for line in open(sys.argv[1]):
    m, secs, idx, cpu = line.rstrip("\n").split("\t")
    rows[m] = {"seconds": float(secs), "indexes": int(idx), "cpu_seconds": float(cpu)}

labels = {
    "decant": "decant migrate",
    "pgcopydb": "pgcopydb clone",
    "pg_dump_dir": "pg_dump -Fd + pg_restore",
    "pg_dump_psql": "pg_dump | psql",
    "copy_limit": "COPY limit (binary, 2 pipes)",
}
decant = rows.get("decant", {}).get("seconds")

print(f"PostgreSQL {env['PG_VERSION']}; pgbench SCALE={env['SCALE']} + MIXED_ROWS={env['MIXED_ROWS']}; "
      f"{env['NTABLES']} tables, {env['SRC_INDEXES']} indexes; "
      f"database size {data / 1e6:.1f} MB; CPU busy before runs {env['CPU_BUSY']}%")
print()
fmt = "{:<30} {:>9} {:>8} {:>14} {:>8} {:>8} {:>9}"
print(fmt.format("method", "seconds", "MB/s", "decant/method", "indexes", "CPU s", "CPU s/GB"))
for m, r in rows.items():
    ratio = f"{decant / r['seconds']:.2f}" if decant is not None else "-"
    print(fmt.format(labels[m], f"{r['seconds']:.2f}", f"{data / 1e6 / r['seconds']:.1f}", ratio, r["indexes"],
                     f"{r['cpu_seconds']:.2f}", f"{r['cpu_seconds'] / (data / 1e9):.2f}"))
print()
print("MB/s = source database size (10^6 bytes) / seconds; decant/method = decant seconds / method seconds")
print("(< 1: decant is faster). Row counts of every table matched the source for every method.")
print("CPU s = user + system CPU of the method's own processes (not the servers'); CPU s/GB per 10^9 bytes.")

def ratio(peer):
    return round(decant / rows[peer]["seconds"], 4) if decant is not None and peer in rows else None

pg_dumps = [m for m in ("pg_dump_dir", "pg_dump_psql") if m in rows]
pg_dump = min(pg_dumps, key=lambda m: rows[m]["seconds"]) if pg_dumps else None
secs = lambda m: rows[m]["seconds"] if m in rows else None
summary = {
    "pg_version": env["PG_VERSION"], "scale": int(env["SCALE"]), "mixed_rows": int(env["MIXED_ROWS"]),
    "data_bytes": data, "data_mb": round(data / 1e6, 1), "cpu_busy_percent_before_runs": int(env["CPU_BUSY"]),
    "decant_s": secs("decant"), "pgcopydb_s": secs("pgcopydb"), "pg_dump_dir_s": secs("pg_dump_dir"),
    "pg_dump_psql_s": secs("pg_dump_psql"), "copy_limit_s": secs("copy_limit"),
    "decant_mb_per_s": round(data / 1e6 / decant, 1) if decant is not None else None,
    "time_ratio_vs_pgcopydb": ratio("pgcopydb"),
    "time_ratio_vs_pg_dump": ratio(pg_dump),
    "pg_dump_fastest": pg_dump,
    "time_ratio_vs_copy_limit": ratio("copy_limit"),
    "indexes": {"source": int(env["SRC_INDEXES"]), **{m: r["indexes"] for m, r in rows.items()}},
    "cpu_seconds": {m: r["cpu_seconds"] for m, r in rows.items()},
    "cpu_seconds_per_gb": {m: round(r["cpu_seconds"] / (data / 1e9), 3) for m, r in rows.items()},
    "decant_skipped": decant is None,
}
print(json.dumps(summary, separators=(",", ":")))
EOF
