#!/usr/bin/env bash
# Change-capture benchmark: decant (agent + applier) against PostgreSQL's
# native logical replication (publication/subscription, copy_data = false),
# each replicating the same source into its own identical destination.
#
#   (a) live:    pgbench -c 4 for LIVE_SECONDS while both replicate:
#                source TPS; lag in bytes (source WAL - slot confirmed) and in
#                seconds (a probe row inserted every 0.2 s on the source: time
#                until it is visible on each destination, checked every 10 ms),
#                p50/p99/max.
#   (b) backlog: replication paused (agent stopped, subscription disabled),
#                pgbench -c 4 for BACKLOG_SECONDS with synchronous_commit=off;
#                then each is resumed on its own (decant first) and timed
#                until its destination holds every change.
#   (c) a single large transaction (LARGE_ROWS rows) through decant, for
#       memory: the agent's and applier's peak RSS (VmHWM) over the run.
#
# stdout: a table and, as the LAST line, one JSON object with
# backlog_speedup_vs_native, live_lag_p99_s, agent_rss_mb, applier_rss_mb.
# Progress goes to stderr ("bench: ...").
#
# Run as root after ./scripts/setup.sh (server commands run as `postgres`).
# Environment: SCALE=10 LIVE_SECONDS=60 BACKLOG_SECONDS=60 LARGE_ROWS=2000000
#              DECANT_PG_BINDIR=/usr/lib/postgresql/15/bin
#              ROW_FILTER="aid % 2 = 0": both replicate only the rows of
#              pgbench_accounts that match (decant: a migrate.map `where`;
#              native: a publication row filter), with REPLICA IDENTITY
#              FULL on pgbench_accounts for both (decant's filtered tables
#              need whole old rows when a column can be TOASTed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

BIN=$PWD/target/release/decant
[[ -x $BIN ]] || { echo "bench: $BIN is missing; run ./scripts/setup.sh" >&2; exit 1; }
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install --quiet 'psycopg[binary]' >&2

export DECANT_BIN=$BIN
exec python3 - "$@" <<'EOF'
import json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time
import psycopg

BINDIR = os.environ.get("DECANT_PG_BINDIR", "/usr/lib/postgresql/15/bin")
DECANT = os.environ["DECANT_BIN"]
SCALE = int(os.environ.get("SCALE", "10"))
LIVE = int(os.environ.get("LIVE_SECONDS", "60"))
BACKLOG = int(os.environ.get("BACKLOG_SECONDS", "60"))
LARGE_ROWS = int(os.environ.get("LARGE_ROWS", "2000000"))
ROW_FILTER = os.environ.get("ROW_FILTER", "")
AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

def say(*a):
    print("bench:", *a, file=sys.stderr, flush=True)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

work = tempfile.mkdtemp(prefix="decant-cdc-")
os.chmod(work, 0o755)
if AS_POSTGRES:
    shutil.chown(work, "postgres", "postgres")
clusters, procs = [], []

def cleanup():
    for p in procs:
        if p.poll() is None:
            p.kill()
    for c in clusters:
        subprocess.run(AS_POSTGRES + [f"{BINDIR}/pg_ctl", "-D", c["data"], "-m", "immediate", "stop"],
                       capture_output=True)
    shutil.rmtree(work, ignore_errors=True)

def start_cluster(name):
    data = f"{work}/{name}"
    port = free_port()
    subprocess.run(AS_POSTGRES + [f"{BINDIR}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                  "--no-sync"], check=True, capture_output=True)
    known = b"output_plugin_libraries" in subprocess.run([f"{BINDIR}/postgres", "--describe-config"],
                                                         capture_output=True).stdout
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n"
                "shared_buffers = 512MB\nmax_wal_size = 8GB\ncheckpoint_timeout = 30min\n"
                "fsync = on\nautovacuum = off\nwal_receiver_status_interval = 1\n")
        if known:
            f.write("output_plugin_libraries = 'pgoutput, test_decoding, decant'\n")
    subprocess.run(AS_POSTGRES + [f"{BINDIR}/pg_ctl", "-D", data, "-l", f"{data}.log", "-w", "start"],
                   check=True, capture_output=True)
    c = {"name": name, "data": data, "port": port,
         "dsn": f"host=127.0.0.1 port={port} user=postgres dbname=postgres"}
    clusters.append(c)
    return c

def sql(c, q, params=None, autocommit=True):
    with psycopg.connect(c["dsn"], autocommit=autocommit) as conn:
        cur = conn.execute(q, params)
        return cur.fetchall() if cur.description else None

def pgbench(c, *args, env=None):
    out = subprocess.run([f"{BINDIR}/pgbench", "-h", "127.0.0.1", "-p", str(c["port"]), "-U", "postgres", *args,
                          "postgres"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"pgbench failed: {out.stderr}")
    return out.stdout

def tps_of(out):
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return float("nan")

def lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)

def peak_rss_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")

def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

try:
    say(f"PostgreSQL: {subprocess.run([f'{BINDIR}/postgres', '--version'], capture_output=True, text=True).stdout.strip()}")
    src, d_decant, d_native = start_cluster("source"), start_cluster("dest_decant"), start_cluster("dest_native")
    say(f"pgbench -i -s {SCALE}")
    pgbench(src, "-i", "-q", "-s", str(SCALE))
    sql(src, "CREATE EXTENSION decant")
    sql(src, "CREATE TABLE lag_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL)")
    sql(src, "CREATE TABLE large_txn (id bigint PRIMARY KEY, pad text)")
    if ROW_FILTER:
        say(f"row filter on pgbench_accounts: {ROW_FILTER}")
        sql(src, "ALTER TABLE pgbench_accounts REPLICA IDENTITY FULL")
        sql(src, f"CREATE PUBLICATION cdc FOR TABLE pgbench_accounts WHERE ({ROW_FILTER}), pgbench_branches, pgbench_tellers, "
                 "pgbench_history, lag_probe, large_txn")
    else:
        sql(src, "CREATE PUBLICATION cdc FOR ALL TABLES")
    dump = subprocess.run([f"{BINDIR}/pg_dump", "-h", "127.0.0.1", "-p", str(src["port"]), "-U", "postgres",
                           "--no-publications", "postgres"], capture_output=True, check=True).stdout
    for d in (d_decant, d_native):
        subprocess.run([f"{BINDIR}/psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(d["port"]),
                        "-U", "postgres", "postgres"], input=dump, check=True, capture_output=True)
    if ROW_FILTER:
        # The destinations start as the filter leaves them.
        for d in (d_decant, d_native):
            sql(d, f"DELETE FROM pgbench_accounts WHERE NOT ({ROW_FILTER})")
    say("native: CREATE SUBSCRIPTION (copy_data = false)")
    sql(d_native, f"CREATE SUBSCRIPTION sub CONNECTION '{src['dsn']}' PUBLICATION cdc WITH (copy_data = false)")
    applier_port, applier_metrics = free_port(), free_port()
    config = f"{work}/task.toml"
    with open(config, "w") as f:
        f.write(f'task_id = "bench"\n[source]\ndsn = "{src["dsn"]}"\nslot = "decant_bench"\n'
                f'[destination]\ndsn = "{d_decant["dsn"]}"\n'
                f'[agent]\napplier_url = "http://127.0.0.1:{applier_port}"\nmetrics_listen = ""\n'
                f'[applier]\nlisten = "127.0.0.1:{applier_port}"\nmetrics_listen = "127.0.0.1:{applier_metrics}"\n'
                # A standalone applier refuses to serve without a token.
                f'[transport]\ntoken = "{os.urandom(24).hex()}"\n'
                # pgbench_history has no key and only ever gets INSERTs.
                f'[migrate]\ninsert_only_tables = ["public.pgbench_history"]\n'
                + (f'map = [{{ table = "public.pgbench_accounts", where = {json.dumps(ROW_FILTER)} }}]\n' if ROW_FILTER else ''))

    def start_role(role):
        log = open(f"{work}/{role}.log", "a")
        p = subprocess.Popen([DECANT, role, "--config", config], stdout=log, stderr=log)
        procs.append(p)
        return p

    applier = start_role("applier")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", applier_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    agent = start_role("agent")
    for _ in range(100):
        if sql(src, "SELECT count(*) FROM pg_replication_slots WHERE active")[0][0] == 2:
            break
        time.sleep(0.1)
    time.sleep(1)

    # ------------------------------------------------------------- (a) live
    say(f"live: pgbench -c 4 -j 2 -T {LIVE} with probes every 0.2 s")
    probes, seen = {}, {"decant": {}, "native": {}}
    slot_lag = {"decant": [], "native": []}
    stop = threading.Event()

    def sampler():
        # A probe row every 0.2 s; visibility on both destinations checked
        # every 10 ms, so lag is measured to about 10 ms.
        conns = {"src": psycopg.connect(src["dsn"], autocommit=True),
                 "decant": psycopg.connect(d_decant["dsn"], autocommit=True),
                 "native": psycopg.connect(d_native["dsn"], autocommit=True)}
        n, next_probe = 0, 0.0
        while not stop.is_set():
            t = time.time()
            if t >= next_probe:
                n += 1
                conns["src"].execute("INSERT INTO lag_probe VALUES (%s, now())", (n,))
                probes[n] = time.time()
                next_probe = t + 0.2
                rows = conns["src"].execute(
                    "SELECT slot_name, pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots").fetchall()
                for slot, lag in rows:
                    slot_lag["decant" if slot == "decant_bench" else "native"].append(int(lag))
            for name in ("decant", "native"):
                top = conns[name].execute("SELECT coalesce(max(id), 0) FROM lag_probe").fetchone()[0]
                now = time.time()
                for k in range(len(seen[name]) + 1, top + 1):
                    seen[name][k] = now
            time.sleep(max(0, 0.01 - (time.time() - t)))
        # Let the last probes arrive before judging them.
        until = time.time() + 2
        while time.time() < until and any(len(seen[x]) < n for x in ("decant", "native")):
            for name in ("decant", "native"):
                top = conns[name].execute("SELECT coalesce(max(id), 0) FROM lag_probe").fetchone()[0]
                now = time.time()
                for k in range(len(seen[name]) + 1, top + 1):
                    seen[name][k] = now
            time.sleep(0.01)
        for c in conns.values():
            c.close()

    th = threading.Thread(target=sampler)
    th.start()
    live_tps = tps_of(pgbench(src, "-n", "-c", "4", "-j", "2", "-T", str(LIVE)))
    time.sleep(5)
    stop.set()
    th.join()
    live = {}
    for name in ("decant", "native"):
        lags = [seen[name][k] - probes[k] for k in probes if k in seen[name]]
        missing = len(probes) - len(lags)
        live[name] = {"lag_s_p50": pct(lags, 50), "lag_s_p99": pct(lags, 99), "lag_s_max": max(lags or [float("nan")]),
                      "lag_bytes_p50": pct(slot_lag[name], 50), "lag_bytes_p99": pct(slot_lag[name], 99),
                      "lag_bytes_max": max(slot_lag[name] or [0]), "probes_not_seen": missing}
    say(f"live: source {live_tps:.0f} tps")

    # ---------------------------------------------------------- (b) backlog
    say("backlog: pausing both (agent stopped, subscription disabled)")
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=30)
    sql(d_native, "ALTER SUBSCRIPTION sub DISABLE")
    for _ in range(300):
        if sql(d_native, "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL")[0][0] == 0:
            break
        time.sleep(0.1)
    else:
        raise SystemExit("bench: the native apply worker did not stop after DISABLE")
    before = sql(d_native, "SELECT count(*) FROM pgbench_history")[0][0]
    say(f"backlog: pgbench -c 4 -j 2 -T {BACKLOG} with synchronous_commit = off")
    env = dict(os.environ, PGOPTIONS="-c synchronous_commit=off")
    out = pgbench(src, "-n", "-c", "4", "-j", "2", "-T", str(BACKLOG), env=env)
    backlog_tps = tps_of(out)
    txns = int(next(l for l in out.splitlines() if "number of transactions actually processed" in l).split(":")[1].split("/")[0])
    want = sql(src, "SELECT count(*) FROM pgbench_history")[0][0]
    # The backlog's last transaction: both apply in commit order, so once
    # this row is visible everything before it is (checked after by count).
    # Polling an indexed row keeps the probe's cost off the destination.
    sql(src, "INSERT INTO lag_probe VALUES (-1, now())")
    backlog_bytes = sql(src, "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots "
                             "WHERE slot_name = 'decant_bench'")[0][0]

    # The paused subscriber really applied nothing meanwhile.
    assert sql(d_native, "SELECT count(*) FROM pgbench_history")[0][0] == before, "native kept applying while disabled"

    def cpu_busy_seconds():
        # Whole-machine CPU time in use (not idle), from /proc/stat.
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def postmaster_pid(c):
        with open(os.path.join(c["data"], "postmaster.pid")) as f:
            return int(f.readline())

    def proc_cpu():
        # {pid: (ppid, CPU seconds, command line)} of every process now.
        tck = os.sysconf("SC_CLK_TCK")
        out = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(p)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tck, cmd)
        return out

    def cpu_split(before, after, groups):
        # CPU seconds each named group of processes used between two snapshots.
        used = {name: 0.0 for name, _ in groups}
        for pid, (ppid, cpu, cmd) in after.items():
            for name, match in groups:
                if match(pid, ppid, cmd):
                    used[name] += cpu - before.get(pid, (0, 0.0, ""))[1]
                    break
        return {k: round(v, 1) for k, v in used.items()}

    src_pm = postmaster_pid(src)
    source_groups = [("source walsender", lambda pid, ppid, cmd: ppid == src_pm and "walsender" in cmd),
                     ("source other", lambda pid, ppid, cmd: ppid == src_pm)]

    polls = {}

    def drain(dest):
        t0 = time.time()
        polls[dest["name"]] = 2  # the count below, and commits() after
        with psycopg.connect(dest["dsn"], autocommit=True) as c:
            while not c.execute("SELECT EXISTS (SELECT FROM lag_probe WHERE id = -1)").fetchone()[0]:
                time.sleep(0.02)
                polls[dest["name"]] += 1
                if time.time() - t0 > 3600:
                    raise SystemExit("backlog not drained within an hour")
            took = time.time() - t0
            got = c.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
            if got != want:
                raise SystemExit(f"bench: {dest['name']} holds {got} history rows after the backlog, the source {want}")
        return took

    def commits(dest):
        # Transactions committed in the destination database so far: for
        # decant the applier's own count (it also runs small queries).
        if dest is d_decant:
            with socket.create_connection(("127.0.0.1", applier_metrics)) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                body = b"".join(iter(lambda: s.recv(65536), b"")).decode()
            return int(next(l.split()[1] for l in body.splitlines() if l.startswith("decant_destination_commits_total ")))
        return sql(dest, "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")[0][0]

    say("backlog: resuming decant")
    k0 = commits(d_decant)
    c0 = cpu_busy_seconds()
    p0 = proc_cpu()
    agent = start_role("agent")
    decant_backlog = drain(d_decant)
    decant_cpu = cpu_busy_seconds() - c0
    time.sleep(0.6)  # statistics reach pg_stat_database within 0.5 s
    decant_commits = commits(d_decant) - k0
    dec_pm = postmaster_pid(d_decant)
    decant_split = cpu_split(p0, proc_cpu(), source_groups + [
        ("agent", lambda pid, ppid, cmd: pid == agent.pid),
        ("applier", lambda pid, ppid, cmd: pid == applier.pid),
        ("destination", lambda pid, ppid, cmd: ppid == dec_pm)])
    say(f"backlog: decant drained in {decant_backlog:.1f} s; resuming native")
    k0 = commits(d_native)
    c0 = cpu_busy_seconds()
    p0 = proc_cpu()
    sql(d_native, "ALTER SUBSCRIPTION sub ENABLE")
    native_backlog = drain(d_native)
    native_cpu = cpu_busy_seconds() - c0
    time.sleep(0.6)
    native_commits = commits(d_native) - k0 - polls[d_native["name"]]
    nat_pm = postmaster_pid(d_native)
    native_split = cpu_split(p0, proc_cpu(), source_groups + [("destination", lambda pid, ppid, cmd: ppid == nat_pm)])
    say(f"backlog: native drained in {native_backlog:.1f} s")

    # ------------------------------------------------- (c) a large transaction
    say(f"large transaction: {LARGE_ROWS} rows in one INSERT")
    sql(d_native, "ALTER SUBSCRIPTION sub DISABLE")
    sql(src, f"INSERT INTO large_txn SELECT g, repeat('x', 100) FROM generate_series(1, {LARGE_ROWS}) g")
    t0 = time.time()
    with psycopg.connect(d_decant["dsn"], autocommit=True) as c:
        while c.execute("SELECT count(*) FROM large_txn").fetchone()[0] < LARGE_ROWS:
            time.sleep(0.5)
    large_s = time.time() - t0
    agent_rss, applier_rss = peak_rss_mb(agent.pid), peak_rss_mb(applier.pid)

    # Same data everywhere?
    same = True
    for t, order in (("pgbench_accounts", "aid"), ("pgbench_history", "t::text"), ("lag_probe", "id")):
        q = f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY {order})) FROM {t} t"
        kept = f" WHERE {ROW_FILTER}" if ROW_FILTER and t == "pgbench_accounts" else ""
        s_ = sql(src, q + kept)[0]
        same &= sql(d_decant, q)[0] == s_ and sql(d_native, q)[0] == s_

    changes = txns * 4
    rows = [
        ("decant", live["decant"], decant_backlog),
        ("native", live["native"], native_backlog),
    ]
    print(f"source: pgbench scale {SCALE}; live {LIVE} s at {live_tps:.0f} tps; backlog {BACKLOG} s, "
          f"{txns} transactions ({changes} row changes, {backlog_bytes / 2**20:.0f} MiB of WAL) at {backlog_tps:.0f} tps")
    print()
    print(f"{'':8} {'lag s p50':>10} {'p99':>8} {'max':>8} {'lag MiB p50':>12} {'p99':>8} {'max':>8} "
          f"{'backlog s':>10} {'rows/s':>10}")
    for name, l, b in rows:
        print(f"{name:8} {l['lag_s_p50']:10.3f} {l['lag_s_p99']:8.3f} {l['lag_s_max']:8.3f} "
              f"{l['lag_bytes_p50'] / 2**20:12.2f} {l['lag_bytes_p99'] / 2**20:8.2f} {l['lag_bytes_max'] / 2**20:8.2f} "
              f"{b:10.1f} {changes / b:10.0f}")
    print()
    print(f"backlog speed-up vs native: {native_backlog / decant_backlog:.2f}x; CPU seconds used while draining "
          f"(whole machine, {os.cpu_count()} CPUs): decant {decant_cpu:.1f}, native {native_cpu:.1f}")
    print(f"  destination transactions while draining: decant {decant_commits}, native {native_commits}")
    print("  by process: decant " + ", ".join(f"{k} {v}" for k, v in decant_split.items())
          + "; native " + ", ".join(f"{k} {v}" for k, v in native_split.items()))
    print(f"large transaction ({LARGE_ROWS} rows) through decant: {large_s:.1f} s")
    print(f"peak RSS: agent {agent_rss:.1f} MB, applier {applier_rss:.1f} MB; destinations equal source: {same}")
    print(json.dumps({
        "scale": SCALE, "row_filter": ROW_FILTER, "live_seconds": LIVE, "backlog_seconds": BACKLOG, "live_tps": round(live_tps, 1),
        "backlog_transactions": txns, "backlog_row_changes": changes,
        "backlog_decant_s": round(decant_backlog, 2), "backlog_native_s": round(native_backlog, 2),
        "backlog_speedup_vs_native": round(native_backlog / decant_backlog, 3),
        "backlog_cpu_seconds_decant": round(decant_cpu, 1), "backlog_cpu_seconds_native": round(native_cpu, 1),
        "backlog_cpu_by_process": {"decant": decant_split, "native": native_split},
        "backlog_destination_transactions": {"decant": decant_commits, "native": native_commits},
        "decant_rows_per_s": round(changes / decant_backlog), "native_rows_per_s": round(changes / native_backlog),
        "live_lag_p50_s": round(live["decant"]["lag_s_p50"], 3), "live_lag_p99_s": round(live["decant"]["lag_s_p99"], 3),
        "live_lag_max_s": round(live["decant"]["lag_s_max"], 3),
        "native_live_lag_p99_s": round(live["native"]["lag_s_p99"], 3),
        "live": live, "large_transaction_rows": LARGE_ROWS, "large_transaction_s": round(large_s, 1),
        "agent_rss_mb": round(agent_rss, 1), "applier_rss_mb": round(applier_rss, 1), "destinations_equal": same,
    }))
    if not same:
        raise SystemExit("bench: a destination differs from the source")
finally:
    cleanup()
EOF
