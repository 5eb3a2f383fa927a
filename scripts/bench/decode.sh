#!/usr/bin/env bash
# Decoding benchmark: decant vs. pgoutput (text/binary), wal2json (v1/v2),
# decoderbufs and test_decoding, all decoding the same WAL.
#
# Starts a throwaway PostgreSQL 15 cluster, creates one logical slot per
# plugin, runs a pgbench tpcb-like load plus a mixed-type/TOAST workload, then
# drains each slot with pg_recvlogical up to the same end LSN, one slot at a
# time, and reports seconds, changes/s, output bytes and bytes/change.
#
# stdout: PostgreSQL version + parameters, a table, and as the LAST line one
# JSON object. Progress goes to stderr ("bench: ...").
#
# Notes on what is measured:
#   - seconds = wall time of one pg_recvlogical run (walsender decode + stream
#     + client write), so per-message transport cost is included: plugins that
#     send one message per transaction (wal2json format-version=1) pay it less.
#   - output bytes = exact sum of message sizes, from a non-consuming peek with
#     the same options (pg_recvlogical's per-message newline is not counted).
#   - changes = INSERT/UPDATE/DELETE rows, counted in test_decoding's output.
#   - decant is drained twice: first with one record per message (the default,
#     what pg_recvlogical users get), last with max_message_bytes=65536, the
#     way the agent reads (a transaction's records packed into bounded
#     messages). The ratios use the packed run. Timings are noisy on a busy
#     machine (see CPU busy).
#   - "peek s", for reference: the same decode through
#     pg_logical_slot_peek_binary_changes (no walsender, no client).
#
# Run as root (PostgreSQL server commands run as the `postgres` user).
# Environment:
#   TXNS=100000      pgbench transactions in total (4 clients, TXNS/4 each)
#   SCALE=10         pgbench -i scale factor
#   DECANT_PG_BINDIR=/usr/lib/postgresql/15/bin
#   DECANT_BIN=target/release/decant
set -euo pipefail

# decant's binary, for the agent rows (the script later runs in a temp dir).
DECANT=${DECANT_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release/decant}
TXNS=${TXNS:-100000}
SCALE=${SCALE:-10}
BINDIR=${DECANT_PG_BINDIR:-/usr/lib/postgresql/15/bin}
DB=bench

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (server commands are run as the postgres user via runuser)"
id postgres >/dev/null 2>&1 || die "no 'postgres' user; run ./scripts/setup.sh"
command -v python3 >/dev/null || die "python3 is required"
for bin in initdb pg_ctl postgres psql pgbench pg_recvlogical; do
    [[ -x $BINDIR/$bin ]] || die "$BINDIR/$bin not found (set DECANT_PG_BINDIR)"
done
PKGLIBDIR=$("$BINDIR/pg_config" --pkglibdir 2>/dev/null || echo "$BINDIR/../lib")
[[ -x $DECANT ]] || die "$DECANT not found (build it: cargo build --release -p decant-agent, or set DECANT_BIN)"
for lib in wal2json decoderbufs decant; do
    [[ -f $PKGLIBDIR/$lib.so ]] \
        || die "$PKGLIBDIR/$lib.so is missing; run ./scripts/setup.sh (it installs wal2json, decoderbufs and decant)"
done

# --- throwaway cluster ----------------------------------------------------------
WORK=$(mktemp -d)
chown postgres: "$WORK"
PGDATA=$WORK/data
started=0
cleanup() {
    if ((started)); then
        runuser -u postgres -- "$BINDIR/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# The postgres user may not be able to read the caller's cwd.
cd "$WORK"

PORT=$(python3 - <<'EOF'
import socket
for port in range(55432, 55632):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    raise SystemExit("no free port in 55432..55631")
EOF
)

say "initdb in $WORK (port $PORT)"
runuser -u postgres -- "$BINDIR/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
{
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PORT"
    echo "unix_socket_directories = '$WORK'"
    echo "wal_level = logical"
    echo "max_replication_slots = 20"
    echo "max_wal_senders = 20"
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "shared_buffers = 256MB"
    echo "max_wal_size = 4GB"
    # Autovacuum of the freshly loaded tables would otherwise compete with the
    # first timed drains on a small machine; it does not change what is decoded.
    echo "autovacuum = off"
    # Only some builds have this GUC; where present, every plugin must be listed.
    # (grep -q would exit early and, with pipefail, fail the pipeline via SIGPIPE)
    if "$BINDIR/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
        echo "output_plugin_libraries = 'pgoutput, test_decoding, decant, wal2json, decoderbufs'"
    fi
} >>"$PGDATA/postgresql.conf"
runuser -u postgres -- "$BINDIR/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w start >/dev/null \
    || { tail -n 30 "$WORK/server.log" >&2; die "server did not start"; }
started=1

CONN=(-h 127.0.0.1 -p "$PORT" -U postgres)
psql_() { "$BINDIR/psql" "${CONN[@]}" -X -q -At -v ON_ERROR_STOP=1 "$@"; }

PG_VERSION=$(psql_ -d postgres -c "SHOW server_version")
say "PostgreSQL $PG_VERSION; TXNS=$TXNS SCALE=$SCALE"

# --- schema (before the slots, so none of it is decoded) ------------------------------
psql_ -d postgres -c "CREATE DATABASE $DB"
say "pgbench -i -s $SCALE"
"$BINDIR/pgbench" "${CONN[@]}" -i -s "$SCALE" -q "$DB" >"$WORK/pgbench-init.log" 2>&1 \
    || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
psql_ -d "$DB" <<'SQL'
CREATE EXTENSION decant;
CREATE TABLE mixed (
    id bigserial PRIMARY KEY, i int, b bigint, n numeric(12,2), f float8,
    t text, v varchar(40), c char(20), ts timestamptz, d date, u uuid,
    j jsonb, flag bool, big text);
-- EXTERNAL: big values go to TOAST uncompressed, so unchanged-TOAST handling
-- on UPDATE is exercised with realistic (not compressed-away) sizes.
ALTER TABLE mixed ALTER big SET STORAGE EXTERNAL;
-- pgoutput only emits tables that are in a publication.
CREATE PUBLICATION bench FOR ALL TABLES;
SQL

# --- slots (all before the load, so they all see the same WAL) --------------------
SLOTS=(decant pgoutput_text pgoutput_binary wal2json_1 wal2json_2 decoderbufs test_decoding decant_packed)
# The same WAL read by decant's agent code (`decant inspect --summary`,
# which peeks through SQL and turns pgoutput's and test_decoding's output
# into decant's records as the agent does when source.decoder chooses them).
AGENT_SLOTS=(agent_decant agent_pgoutput agent_test_decoding)
declare -A PLUGIN=(
    [agent_decant]=decant [agent_pgoutput]=pgoutput [agent_test_decoding]=test_decoding
    [decant]=decant [decant_packed]=decant
    [pgoutput_text]=pgoutput [pgoutput_binary]=pgoutput
    [wal2json_1]=wal2json [wal2json_2]=wal2json
    [decoderbufs]=decoderbufs [test_decoding]=test_decoding
)
# Plugin options as name=value words; used both for peek and pg_recvlogical -o.
declare -A OPTS=(
    # How the agent reads: a transaction's records packed into messages of
    # up to 64 KiB (still bounded memory, never a whole large transaction).
    [decant_packed]="max_message_bytes=65536"
    [pgoutput_text]="proto_version=1 publication_names=bench"
    [pgoutput_binary]="proto_version=1 publication_names=bench binary=true"
    [wal2json_1]="format-version=1"
    [wal2json_2]="format-version=2"
)
# decoderbufs sends "INFO: Exiting startup callback" whenever it starts (INFO
# ignores client_min_messages), so plugin stderr goes to files, shown on error.
# "warmup" is drained untimed before the others: in trials the first drain
# after the load was consistently ~25% slower whichever plugin it used.
for s in "${SLOTS[@]}" "${AGENT_SLOTS[@]}" warmup; do
    psql_ -d "$DB" -c "SELECT pg_create_logical_replication_slot('$s', '${PLUGIN[$s]:-test_decoding}')" >/dev/null 2>"$WORK/slot.err" \
        || { cat "$WORK/slot.err" >&2; die "could not create slot $s"; }
done
say "created slots: ${SLOTS[*]} ${AGENT_SLOTS[*]} warmup"

# --- load --------------------------------------------------------------------------
say "pgbench tpcb-like: $TXNS transactions (-c 4 -j 2 -t $((TXNS / 4)))"
t0=$(date +%s.%N)
"$BINDIR/pgbench" "${CONN[@]}" -n -c 4 -j 2 -t $((TXNS / 4)) "$DB" >"$WORK/pgbench.log" 2>&1 \
    || { cat "$WORK/pgbench.log" >&2; die "pgbench failed"; }
say "pgbench done in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s ($(grep -m1 '^tps' "$WORK/pgbench.log" || true))"

say "mixed table: 20000 inserts, 20000 updates, 1200 deletes"
{
    # 20 transactions of 1000 rows; every 10th row carries a ~3.2 kB TOASTed value.
    for k in $(seq 0 19); do
        lo=$((k * 1000 + 1)) hi=$(((k + 1) * 1000))
        cat <<SQL
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
       CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 100)
            WHEN g % 10 IN (1, 2, 3) THEN NULL
            ELSE 'short ' || g END
FROM generate_series($lo, $hi) g;
SQL
    done
    # 20 transactions of 1000 updates of i only; half the rows (id % 10 = 0)
    # have a TOASTed big, so the decoders see unchanged-TOAST columns.
    for k in $(seq 0 19); do
        lo=$(((k % 4) * 5000 + 1)) hi=$(((k % 4 + 1) * 5000))
        echo "UPDATE mixed SET i = i + 1 WHERE id % 5 = 0 AND id BETWEEN $lo AND $hi;"
    done
    echo "DELETE FROM mixed WHERE id % 20 = 3;"
    echo "DELETE FROM mixed WHERE id % 100 = 0;"
} | psql_ -d "$DB"

psql_ -d "$DB" -c "CHECKPOINT"
END_LSN=$(psql_ -d "$DB" -c "SELECT pg_current_wal_lsn()")
say "end LSN $END_LSN"

# --- exact output sizes (peek does not consume) -------------------------------------
declare -A COUNT BYTES SECS PEEK_SECS FILE_BYTES EXCLUDED
peek_args() { # name=value words -> ", 'name', 'value', ..."
    local o
    for o in $1; do printf ", '%s', '%s'" "${o%%=*}" "${o#*=}"; done
}
for s in "${SLOTS[@]}"; do
    t0=$(date +%s.%N)
    if ! out=$(psql_ -d "$DB" -F ' ' -c "SELECT count(*), coalesce(sum(octet_length(data)), 0)
              FROM pg_logical_slot_peek_binary_changes('$s', '$END_LSN', NULL$(peek_args "${OPTS[$s]:-}"))" 2>"$WORK/peek.err"); then
        if [[ $s == decoderbufs ]]; then
            EXCLUDED[$s]="peek failed: $(head -n 1 "$WORK/peek.err")"
            say "excluding $s: ${EXCLUDED[$s]}"
            continue
        fi
        cat "$WORK/peek.err" >&2
        die "peek of slot $s failed"
    fi
    read -r COUNT[$s] BYTES[$s] <<<"$out"
    PEEK_SECS[$s]=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.3f}')")
    say "peek $s: ${COUNT[$s]} messages, ${BYTES[$s]} bytes (${PEEK_SECS[$s]} s)"
done

# --- timed drains, one at a time; decant first and (packed) last --------------------
# Timings are only comparable on an otherwise idle machine. Our cluster is
# idle here (autovacuum is off), so CPU use now is someone else's; the load
# average would mostly reflect our own pgbench run.
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
    say "WARNING: CPU ${CPU_BUSY}% busy before the timed drains; other work may skew timings"
fi
say "untimed warm-up drain (test_decoding)"
"$BINDIR/pg_recvlogical" "${CONN[@]}" -d "$DB" --slot warmup --start --endpos="$END_LSN" \
    --no-loop -F 0 -f "$WORK/warmup.out" 2>"$WORK/warmup.err" \
    || { cat "$WORK/warmup.err" >&2; die "warm-up drain failed"; }
rm -f "$WORK/warmup.out"

CHANGES=
for s in "${SLOTS[@]}"; do
    [[ -z ${EXCLUDED[$s]:-} ]] || continue
    opts=()
    for o in ${OPTS[$s]:-}; do opts+=(-o "$o"); done
    outfile=$WORK/$s.out
    # -F 0: no fsync of the output file, so disk flushes do not pollute timings.
    t0=$(date +%s.%N)
    if ! "$BINDIR/pg_recvlogical" "${CONN[@]}" -d "$DB" --slot "$s" --start --endpos="$END_LSN" \
        --no-loop -F 0 -f "$outfile" "${opts[@]}" 2>"$WORK/$s.err"; then
        if [[ $s == decoderbufs ]]; then
            EXCLUDED[$s]="pg_recvlogical failed: $(head -n 1 "$WORK/$s.err")"
            say "excluding $s: ${EXCLUDED[$s]}"
            continue
        fi
        cat "$WORK/$s.err" >&2
        die "pg_recvlogical for slot $s failed"
    fi
    t1=$(date +%s.%N)
    SECS[$s]=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
    FILE_BYTES[$s]=$(stat -c %s "$outfile")
    # pg_recvlogical adds one newline per message; check it saw what peek saw.
    if ((FILE_BYTES[$s] != BYTES[$s] + COUNT[$s])); then
        say "WARNING: $s: pg_recvlogical wrote ${FILE_BYTES[$s]} bytes, peek predicts $((BYTES[$s] + COUNT[$s]))"
    fi
    if [[ $s == test_decoding ]]; then
        CHANGES=$(grep -a -c '^table ' "$outfile" || true)
    fi
    rm -f "$outfile"
    say "drained $s in ${SECS[$s]} s"
done
[[ -n $CHANGES && $CHANGES -gt 0 ]] || die "no changes counted from test_decoding output"

# --- the fallback decoders through the agent's translation ---------------------------
declare -A AGENT_SECS AGENT_BYTES
for s in "${AGENT_SLOTS[@]}"; do
    opts=()
    [[ $s != agent_pgoutput ]] || opts=(-o publication_names=bench)
    t0=$(date +%s.%N)
    summary=$("$DECANT" inspect --dsn "host=127.0.0.1 port=$PORT user=postgres dbname=$DB" --slot "$s" --summary \
        "${opts[@]}" 2>"$WORK/$s.err") || { cat "$WORK/$s.err" >&2; die "decant inspect of slot $s failed"; }
    AGENT_SECS[$s]=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.3f}')")
    AGENT_BYTES[$s]=$(awk '$1 == "total" { print $(NF-1) }' <<<"$summary")
    say "agent read $s: ${AGENT_SECS[$s]} s, ${AGENT_BYTES[$s]} bytes of decant records"
done

# --- report ----------------------------------------------------------------------------
results=$WORK/results.tsv
: >"$results"
for s in "${SLOTS[@]}"; do
    if [[ -n ${EXCLUDED[$s]:-} ]]; then
        printf '%s\t%s\texcluded\t\t\t\t%s\n' "$s" "${PLUGIN[$s]}" "${EXCLUDED[$s]}" >>"$results"
    else
        printf '%s\t%s\tok\t%s\t%s\t%s\t\n' "$s" "${PLUGIN[$s]}" "${SECS[$s]}" "${BYTES[$s]}" "${PEEK_SECS[$s]}" >>"$results"
    fi
done

for s in "${AGENT_SLOTS[@]}"; do
    printf '%s\t%s\tagent\t%s\t%s\t\t\n' "$s" "${PLUGIN[$s]}" "${AGENT_SECS[$s]}" "${AGENT_BYTES[$s]}" >>"$results"
done
PG_VERSION=$PG_VERSION TXNS=$TXNS SCALE=$SCALE CHANGES=$CHANGES END_LSN=$END_LSN CPU_BUSY=$CPU_BUSY \
    python3 - "$results" <<'EOF'
import json, os, sys

env = os.environ
changes = int(env["CHANGES"])
rows, excluded, agent = {}, {}, {}
for line in open(sys.argv[1]):
    slot, plugin, status, secs, nbytes, peek, note = line.rstrip("\n").split("\t")
    if status == "agent":
        agent[plugin] = {"seconds": float(secs), "bytes": int(nbytes), "changes_per_second": changes / float(secs)}
        continue
    if status == "excluded":
        excluded[slot] = note
        continue
    secs, nbytes = float(secs), int(nbytes)
    rows[slot] = {"plugin": plugin, "seconds": secs, "bytes": nbytes, "peek_seconds": float(peek),
                  "bytes_per_change": nbytes / changes, "changes_per_second": changes / secs}

# Headline: decant as the agent reads it (packed messages); the default of
# one record per message (what pg_recvlogical users get) is shown too.
decant = dict(rows["decant_packed"])
peers = [s for s in rows if rows[s]["plugin"] != "decant"]
fastest = max(peers, key=lambda s: rows[s]["changes_per_second"])

print(f"PostgreSQL {env['PG_VERSION']}; pgbench TXNS={env['TXNS']} SCALE={env['SCALE']}; "
      f"changes={changes} (from test_decoding); end LSN {env['END_LSN']}; "
      f"CPU busy before drains {env['CPU_BUSY']}%")
print()
hdr = ("plugin", "seconds", "changes/s", "output bytes", "bytes/change",
       "bytes/chg vs decant", "speed decant/peer", "peek s")
fmt = "{:<18} {:>9} {:>11} {:>14} {:>13} {:>20} {:>18} {:>8}"
print(fmt.format(*hdr))
def line(name, r):
    print(fmt.format(name, f"{r['seconds']:.3f}", f"{r['changes_per_second']:,.0f}", f"{r['bytes']:,}",
                     f"{r['bytes_per_change']:.2f}",
                     f"{r['bytes_per_change'] / decant['bytes_per_change']:.2f}",
                     f"{decant['changes_per_second'] / r['changes_per_second']:.2f}",
                     f"{r['peek_seconds']:.3f}"))
line("decant (packed)", rows["decant_packed"])
line("decant (1 rec/msg)", rows["decant"])
for s in peers:
    line(s, rows[s])
for s, note in excluded.items():
    print(f"{s:<18} excluded: {note}")
print()
print("bytes/chg vs decant = peer bytes/change / decant bytes/change (>1: peer output is larger);")
print("speed decant/peer = decant changes/s / peer changes/s (>1: decant is faster);")
print("peek s = the same decode via pg_logical_slot_peek_binary_changes (no streaming; reference only).")
print()
print("read by decant's agent code (decant inspect --summary: SQL peek, translation into decant records, CRC check):")
afmt = "{:<18} {:>9} {:>11} {:>20} {:>22}"
print(afmt.format("source.decoder", "seconds", "changes/s", "decant record bytes", "time vs decant plugin"))
for plugin in ("decant", "pgoutput", "test_decoding"):
    a = agent[plugin]
    print(afmt.format(plugin, f"{a['seconds']:.3f}", f"{a['changes_per_second']:,.0f}", f"{a['bytes']:,}",
                      f"{a['seconds'] / agent['decant']['seconds']:.2f}"))

pgo = rows["pgoutput_text"]
summary = {
    "pg_version": env["PG_VERSION"], "txns": int(env["TXNS"]), "scale": int(env["SCALE"]),
    "end_lsn": env["END_LSN"], "cpu_busy_percent_before_drains": int(env["CPU_BUSY"]), "changes": changes,
    "decant_seconds": decant["seconds"],
    "decant_one_record_per_message_seconds": rows["decant"]["seconds"],
    "decant_bytes": decant["bytes"],
    "decant_bytes_per_change": round(decant["bytes_per_change"], 4),
    "bytes_per_change_ratio_vs_pgoutput": round(decant["bytes_per_change"] / pgo["bytes_per_change"], 4),
    "throughput_ratio_vs_pgoutput": round(decant["changes_per_second"] / pgo["changes_per_second"], 4),
    "throughput_ratio_vs_fastest_peer": round(decant["changes_per_second"] / rows[fastest]["changes_per_second"], 4),
    "fastest_peer": fastest,
    "plugins": {s: {"seconds": r["seconds"], "bytes": r["bytes"],
                    "bytes_per_change": round(r["bytes_per_change"], 4),
                    "peek_seconds": r["peek_seconds"]} for s, r in rows.items()},
    "excluded": excluded,
    "agent": agent,
}
print(json.dumps(summary, separators=(",", ":")))
EOF
