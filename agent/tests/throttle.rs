//! Throttling changed while the task runs, measured on real clusters.
//!
//! One `decant migrate` task (schema, full, incremental): the copy of one
//! wide table held to a rows/s limit, then (SIGHUP after rewriting the
//! file) to an MB/s limit, then raised; forty one-row tables copied under
//! a source queries/s limit; then a backlog streamed under the applier's
//! rows/s limit, then its MB/s limit, then unlimited. Each rate is
//! measured outside decant (the destination's `pg_stat_progress_copy`,
//! the source's statement log, rows committed on the destination) over
//! several seconds and must hold its limit within 20 %. `decant status`
//! and the metrics show the throttle in force and the lag alert firing,
//! and at the end the destination compares equal (no position lost).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use decant_tests::process::{free_port, http_get, wait_for, Role};
use decant_tests::Cluster;

const MB: f64 = 1048576.0;
/// Payload of each streamed row: 1 KB, so MB/s of records is about
/// rows/s / 1024.
const PAYLOAD: usize = 1024;

fn decant() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_decant"))
}

struct Task {
    source: Cluster,
    dest: Cluster,
    dir: tempfile::TempDir,
    config: PathBuf,
    metrics_port: u16,
}

/// The five limits, in the order copy rows/s, copy MB/s, source
/// queries/s, apply rows/s, apply MB/s.
type Limits = [u64; 5];

impl Task {
    /// Writes the configuration with `limits` (and `extra` applier lines).
    fn write(&self, limits: Limits, extra: &str) {
        let [rows, mb, queries, apply_rows, apply_mb] = limits;
        std::fs::write(
            &self.config,
            format!(
                "task_id = \"th\"\n\
                 [source]\ndsn = \"{}\"\nslot = \"decant_th\"\nheartbeat_seconds = 1\n\
                 [destination]\ndsn = \"{}\"\n\
                 [agent]\nmetrics_listen = \"127.0.0.1:{}\"\nstatus_interval_seconds = 1\nbatch_max_bytes = 65536\n\
                 [applier]\nmetrics_listen = \"\"\nmax_rows_per_second = {apply_rows}\nmax_mb_per_second = {apply_mb}\n{extra}\
                 [migrate]\nprogress = \"log\"\ntypes = [\"schema\", \"full\", \"incremental\"]\nworkers = 1\n\
                 max_rows_per_second = {rows}\nmax_mb_per_second = {mb}\nmax_source_queries_per_second = {queries}\n\
                 [alert]\ncommand = \"true\"\nlag_bytes = 1\n",
                self.source.conninfo("postgres"),
                self.dest.conninfo("postgres"),
                self.metrics_port,
            ),
        )
        .unwrap();
    }

    /// Rewrites the configuration and sends SIGHUP to `role`.
    fn reload(&self, role: &Role, limits: Limits, extra: &str) {
        self.write(limits, extra);
        let ok = Command::new("kill").args(["-HUP", &role.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -HUP");
    }

    fn command(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(decant()).args(args).arg("--config").arg(&self.config).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Rows and bytes the destination's COPYs have taken in so far.
fn copy_progress(dest: &mut postgres::Client) -> (f64, f64) {
    let r = dest
        .query_one(
            "SELECT coalesce(sum(tuples_processed), 0)::float8, coalesce(sum(bytes_processed), 0)::float8 FROM pg_stat_progress_copy",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// The change of `f` per second over `seconds`.
fn rate(seconds: u64, mut f: impl FnMut() -> f64) -> f64 {
    let (a, t0) = (f(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (b, t1) = (f(), Instant::now());
    (b - a) / t1.duration_since(t0).as_secs_f64()
}

fn within(what: &str, measured: f64, limit: f64) {
    println!("{what}: limit {limit}, measured {measured:.2} ({:+.1} %)", (measured / limit - 1.0) * 100.0);
    assert!((measured - limit).abs() <= 0.2 * limit, "{what}: measured {measured:.2}, limit {limit}: off by more than 20 %");
}

/// The source's COPY statements from decant's copy workers, as logged.
fn copies_logged(source: &Cluster) -> f64 {
    source.log().lines().filter(|l| l.contains("[decant copy") && l.contains("COPY ")).count() as f64
}

fn metric(port: u16, name: &str) -> f64 {
    let body = http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

#[test]
fn throttles_hold_their_limits_and_change_live() {
    let source = Cluster::start_with(&["log_statement = 'all'", "log_line_prefix = '%m [%a] '"]);
    let dest = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("task.toml");
    let t = Task { source, dest, dir, config, metrics_port: free_port() };
    let mut src = t.source.connect();
    src.batch_execute(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, pad text);
         INSERT INTO wide SELECT i, rpad(md5(i::text), 200, 'x') FROM generate_series(1, 400000) i;
         CREATE TABLE s (id bigint PRIMARY KEY, pad text);
         CREATE PROCEDURE load(n int) LANGUAGE plpgsql AS $$
         BEGIN
             FOR b IN 0 .. n / 100 - 1 LOOP
                 INSERT INTO s SELECT i, rpad(md5(i::text), {PAYLOAD}, 'y') FROM generate_series(b * 100 + 1, b * 100 + 100) i;
                 COMMIT;
             END LOOP;
         END $$;
         DO $$BEGIN FOR i IN 1 .. 40 LOOP
             EXECUTE format('CREATE TABLE q%s (id int PRIMARY KEY, v text); INSERT INTO q%s VALUES (1, ''one'')', i, i);
         END LOOP; END $$;"
    ))
    .unwrap();
    let mut dst = t.dest.connect();

    // The copy, by rows/s.
    t.write([10_000, 0, 0, 2000, 0], "");
    let m = Role::start(decant(), "migrate", &t.config, &t.dir.path().join("migrate.log"));
    wait_for("the copy of wide", Duration::from_secs(60), || copy_progress(&mut dst).0 > 0.0);
    std::thread::sleep(Duration::from_secs(2));
    within("copy rows/s", rate(8, || copy_progress(&mut dst).0), 10_000.0);

    // By MB/s, changed live.
    t.reload(&m, [0, 2, 0, 2000, 0], "");
    std::thread::sleep(Duration::from_secs(2));
    let slow = rate(8, || copy_progress(&mut dst).1) / MB;
    within("copy MB/s", slow, 2.0);

    // Raised live: faster at once.
    t.reload(&m, [0, 6, 0, 2000, 0], "");
    std::thread::sleep(Duration::from_secs(1));
    let fast = rate(4, || copy_progress(&mut dst).1) / MB;
    println!("copy MB/s raised to 6: measured {fast:.2}");
    assert!(fast > 1.5 * slow, "raising max_mb_per_second from 2 to 6 did not speed the copy up: {slow:.2} -> {fast:.2} MB/s");

    // The one-row tables, by source queries/s (each is one COPY).
    t.reload(&m, [0, 0, 4, 2000, 0], "");
    let before = copies_logged(&t.source);
    wait_for("the first small table's COPY", Duration::from_secs(60), || copies_logged(&t.source) >= before + 2.0);
    std::thread::sleep(Duration::from_secs(1));
    within("source queries/s", rate(6, || copies_logged(&t.source)), 4.0);

    // The stream, by the applier's rows/s.
    let phase = |dst: &mut postgres::Client| -> String {
        dst.query_opt("SELECT phase FROM decant.task WHERE task_id = 'th'", &[]).ok().flatten().map(|r| r.get(0)).unwrap_or_default()
    };
    wait_for("the incremental phase", Duration::from_secs(60), || phase(&mut dst) == "incremental");
    const STREAMED: i64 = 60_000;
    src.batch_execute(&format!("CALL load({STREAMED})")).unwrap();
    let mut applied = || dst.query_one("SELECT count(*)::float8 FROM s", &[]).unwrap().get::<_, f64>(0);
    wait_for("the first streamed rows", Duration::from_secs(60), || applied() > 0.0);
    std::thread::sleep(Duration::from_secs(2));
    within("stream rows/s", rate(8, &mut applied), 2000.0);

    // What status and the metrics show meanwhile: the throttle in force,
    // and the lag alert (lag_bytes = 1) firing.
    let (ok, json) = t.command(&["status", "--json"]);
    assert!(ok, "{json}");
    let status: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    let throttle = &status["throttle"];
    assert_eq!(throttle["apply_max_rows_per_second"], 2000, "{status}");
    assert_eq!(throttle["apply_max_mb_per_second"], 0, "{status}");
    assert_eq!(throttle["copy_max_source_queries_per_second"], 4, "{status}");
    assert_eq!(throttle["copy_max_mb_per_second"], 0, "{status}");
    let alerts = status["alerts"].as_array().unwrap();
    assert!(alerts.iter().any(|a| a["kind"] == "lag" && a["message"].as_str().unwrap().contains("bytes")), "{status}");
    let (_, text) = t.command(&["status"]);
    assert!(
        text.contains("throttle: copy unlimited rows/s, unlimited MB/s, 4 source queries/s; stream 2000 rows/s, unlimited MB/s"),
        "{text}"
    );
    assert!(text.contains("alert firing since") && text.contains("lag: replication lag is"), "{text}");
    assert_eq!(metric(t.metrics_port, "decant_throttle_apply_max_rows_per_second"), 2000.0);
    assert_eq!(metric(t.metrics_port, "decant_throttle_copy_max_source_queries_per_second"), 4.0);

    // By the applier's MB/s of records, changed live (with a setting that
    // needs a restart, which is only reported).
    t.reload(&m, [0, 0, 4, 0, 1], "group_max_delay_ms = 300\n");
    std::thread::sleep(Duration::from_secs(2));
    let batch_bytes = || metric(t.metrics_port, "decant_batch_bytes_applied_total");
    let (b0, r0, t0) = (batch_bytes(), applied(), Instant::now());
    std::thread::sleep(Duration::from_secs(8));
    let (b1, r1, t1) = (batch_bytes(), applied(), Instant::now());
    let seconds = t1.duration_since(t0).as_secs_f64();
    let slow_rows = (r1 - r0) / seconds;
    println!("stream record MB/s by decant's own count: {:.3}", (b1 - b0) / seconds / MB);
    within("stream MB/s (payload of the rows committed)", slow_rows * PAYLOAD as f64 / MB, 1.0);

    // Unlimited: the rest drains fast.
    t.reload(&m, [0, 0, 4, 0, 0], "group_max_delay_ms = 300\n");
    let (left, start) = (STREAMED as f64 - applied(), Instant::now());
    wait_for("the backlog", Duration::from_secs(60), || applied() >= STREAMED as f64);
    let fast_rows = left / start.elapsed().as_secs_f64();
    println!("stream rows/s unthrottled: {fast_rows:.0} ({left} rows)");
    assert!(fast_rows > 2.0 * slow_rows, "lifting the limit did not speed the stream up: {slow_rows:.0} -> {fast_rows:.0} rows/s");

    let (ok, out) = t.command(&["verify", "--wait", "120"]);
    assert!(ok, "{out}\n{}", m.log());
    let log = m.log();
    assert!(log.contains("SIGHUP: new throttle in force"), "{log}");
    assert!(log.contains("applier.max_mb_per_second: unlimited -> 1"), "{log}");
    assert!(log.contains("take effect only after a restart") && log.contains("applier.group_max_delay_ms"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
