//! Safe defaults: an applier never serves anyone who reaches its port
//! unless told to, an agent never sends its token unencrypted to another
//! host unless told to, and passwords appear in no process list, log line,
//! status output or error.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decant_tests::certs::Certs;
use decant_tests::process::{expect, fails, free_port, wait_for, wait_port, Role};
use decant_tests::task::{Config, Task};
use decant_tests::Cluster;

fn decant() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_decant"))
}

/// The machine's first IPv4 address that is not loopback (`hostname -I`).
fn non_loopback_address() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_unspecified())
        .map(|a| a.to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_standalone_applier_serves_only_clients_it_can_authenticate_unless_told() {
    let dest = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // An applier alone.
    let config = Config::empty("s")
        .set("destination.dsn", &format!("\"{}\"", dest.conninfo("postgres")))
        .set("applier.listen", &format!("\"127.0.0.1:{port}\""))
        .set("applier.metrics_listen", "\"\"")
        .write(&dir.path().join("task.toml"));
    let log = |n: &str| dir.path().join(n);
    // The default (no token, no mutual TLS) is refused, naming the fixes.
    let out = fails(&mut Role::start(decant(), "applier", &config, &log("default.log")));
    expect(&out, &["127.0.0.1:", "transport.token = ", "transport.tls_ca", "transport.insecure = true"]);
    // An empty token file is no token (it would match a request without one).
    let empty = write(dir.path(), "empty-token", "\n");
    let overrides = [format!("transport.token_file=\"{}\"", empty.display())];
    let out = fails(&mut Role::start_with(decant(), "applier", &config, &overrides, &log("empty-token.log")));
    expect(&out, &["transport.token_file", "empty"]);
    // TLS without a client CA encrypts, but lets anyone in.
    let certs = Certs::new("decant-agent");
    let tls = [
        format!("transport.tls_cert=\"{}\"", certs.server_cert.display()),
        format!("transport.tls_key=\"{}\"", certs.server_key.display()),
    ];
    let out = fails(&mut Role::start_with(decant(), "applier", &config, &tls, &log("tls.log")));
    expect(&out, &["transport.insecure = true"]);
    // Each way that is allowed starts and serves.
    let mutual_tls = [tls[0].clone(), tls[1].clone(), format!("transport.tls_ca=\"{}\"", certs.ca.display())];
    let allowed: [(&str, &[String]); 3] = [
        ("token", &["transport.token=\"s3cret\"".to_owned()]),
        ("mutual-tls", &mutual_tls),
        ("insecure", &["transport.insecure=true".to_owned()]),
    ];
    for (name, overrides) in allowed {
        let mut applier = Role::start_with(decant(), "applier", &config, overrides, &log(&format!("{name}.log")));
        wait_port(port);
        assert!(applier.is_running(), "{name}: {}", applier.log());
        if name == "insecure" {
            expect(&applier.log(), &["transport.insecure = true: the applier accepts any client"]);
        }
        assert_eq!(applier.stop(), Some(0), "{name}: {}", applier.log());
    }
}

#[test]
fn the_agent_sends_its_token_unencrypted_only_to_loopback_unless_told() {
    let Some(address) = non_loopback_address() else {
        eprintln!("this machine has no IPv4 address besides loopback; skipping");
        return;
    };
    let source = Cluster::start();
    let dest = Cluster::start();
    source.connect().batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // No heartbeats or status interval: a copy alone.
    let config = Config::new("s")
        .dsns(&source.conninfo("postgres"), &dest.conninfo("postgres"))
        .unset("source.heartbeat_seconds")
        .unset("agent.status_interval_seconds")
        .set("agent.applier_url", &format!("\"http://{address}:{port}\""))
        .set("applier.listen", &format!("\"{address}:{port}\""))
        .set("transport.token", "\"s3cret\"")
        .set("migrate.types", "[\"schema\", \"full\"]")
        .write(&dir.path().join("task.toml"));
    let log = |n: &str| dir.path().join(n);
    let mut applier = Role::start(decant(), "applier", &config, &log("applier.log"));
    wait_for("the applier to listen", Duration::from_secs(30), || std::net::TcpStream::connect((address.as_str(), port)).is_ok());
    // Plain http to another address: refused before anything is sent.
    let out = fails(&mut Role::start(decant(), "agent", &config, &log("agent-refused.log")));
    let refusal = format!("agent.applier_url http://{address}:{port} is plain http to {address}");
    expect(&out, &[refusal.as_str(), "https://", "transport.insecure = true"]);
    let created: Option<String> = dest.connect().query_one("SELECT to_regclass('public.t')::text", &[]).unwrap().get(0);
    assert_eq!(created, None, "the refused agent reached the applier:\n{}", applier.log());
    // Told so, it goes ahead.
    let mut agent = Role::start_with(decant(), "agent", &config, &["transport.insecure=true".into()], &log("agent.log"));
    assert_eq!(agent.wait_exit(Duration::from_secs(120)), Some(0), "{}\n{}", agent.log(), applier.log());
    expect(&agent.log(), &["transport.insecure = true: the token goes unencrypted"]);
    let rows: i64 = dest.connect().query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(rows, 100);
    assert_eq!(applier.stop(), Some(0), "{}", applier.log());
}

const PASSWORD: &str = "Zq7-s3cr3t/p@ss word";
const PASSWORD_IN_URI: &str = "Zq7-s3cr3t%2Fp%40ss%20word";

/// Whether `text` shows a part of either secret, in any form.
fn leaks(text: &str) -> bool {
    ["s3cr3t", Certs::KEY_PASSWORD, &Certs::KEY_PASSWORD.replace(' ', "%20")].iter().any(|s| text.contains(s))
}

/// The command lines of `parent` and of its children (pg_dump), sampled
/// every millisecond or so until `stop` is set.
fn sample_command_lines(parent: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<BTreeSet<String>> {
    std::thread::spawn(move || {
        let mut seen = BTreeSet::new();
        while !stop.load(Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
                // pid (comm) state ppid ...: comm may hold spaces and parentheses.
                let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
                if pid == parent || ppid == Some(parent) {
                    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                        seen.insert(String::from_utf8_lossy(&cmdline).replace('\0', " "));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        seen
    })
}

#[test]
fn passwords_appear_in_no_process_list_log_line_or_error() {
    // The source asks for a password, over TLS, with a client certificate
    // whose key is encrypted (sslpassword); the destination for a password.
    let certs = Certs::new("migrator");
    std::fs::set_permissions(&certs.client_key_encrypted, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let source = Cluster::start();
    let mut admin = source.connect();
    for line in certs.install_in_server(source.data_dir()) {
        let (k, v) = line.split_once(" = ").unwrap();
        admin.batch_execute(&format!("ALTER SYSTEM SET {k} = {v}")).unwrap();
    }
    source.add_password_user("migrator", PASSWORD, true);
    let dest = Cluster::start();
    dest.add_password_user("migrator", PASSWORD, false);
    for (cluster, what) in [(&source, "source"), (&dest, "destination")] {
        let without = format!("host=127.0.0.1 port={} user=migrator dbname=postgres", cluster.port());
        assert!(postgres::Client::connect(&without, postgres::NoTls).is_err(), "the {what} lets migrator in without a password");
    }
    // Enough objects that pg_dump runs long enough to be seen.
    let mut schema = String::from(
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    );
    for i in 0..300 {
        schema.push_str(&format!("CREATE TABLE t{i} (id int PRIMARY KEY, v text); COMMENT ON TABLE t{i} IS 'table {i}';"));
    }
    admin.batch_execute(&schema).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = |p: &Path| p.display().to_string();
    let source_dsn = format!(
        "postgresql://migrator:{PASSWORD_IN_URI}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&sslpassword={}",
        source.port(),
        path(&certs.ca),
        path(&certs.client_cert),
        path(&certs.client_key_encrypted),
        Certs::KEY_PASSWORD.replace(' ', "%20")
    );
    let dest_dsn = format!("host=127.0.0.1 port={} user=migrator dbname=postgres password='{PASSWORD}'", dest.port());
    // The test defaults, and every log line (debug) to look at.
    let task = |source_dsn: &str, dest_dsn: &str| {
        Config::new("p")
            .dsns(source_dsn, dest_dsn)
            .set("log.level", "\"debug\"")
            .set("migrate.types", "[\"schema\", \"full\", \"incremental\"]")
            .render()
    };
    let config = write(dir.path(), "task.toml", &task(&source_dsn, &dest_dsn));
    let command = |config: &Path, args: &[&str]| decant_tests::task::command(decant(), config, args);

    let mut migrate = Role::start(decant(), "migrate", &config, &dir.path().join("migrate.log"));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_command_lines(migrate.id(), stop.clone());
    let mut d = dest.connect();
    wait_for("the stream phase", Duration::from_secs(180), || {
        assert!(migrate.is_running(), "decant migrate ended:\n{}", migrate.log());
        d.query_opt("SELECT phase FROM decant.task WHERE task_id = 'p'", &[])
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, String>(0) == "incremental")
    });
    admin.batch_execute("INSERT INTO items SELECT g, 'new' FROM generate_series(1001, 1100) g").unwrap();
    let (ok, verified) = command(&config, &["verify", "--wait", "120"]);
    assert!(ok && verified.contains("tables equal"), "{verified}");
    let (ok, status) = command(&config, &["status"]);
    assert!(ok, "{status}");
    assert_eq!(migrate.stop(), Some(0), "{}", migrate.log());
    stop.store(true, Ordering::Relaxed);
    let command_lines = sampler.join().unwrap();

    assert!(
        command_lines.iter().any(|c| c.contains("pg_dump") && c.contains("--dbname")),
        "pg_dump was never seen running; command lines seen: {command_lines:#?}"
    );
    for c in &command_lines {
        assert!(!leaks(c), "a secret in a process list: {c}");
    }
    let log = migrate.log();
    assert!(log.contains("schema dumped") && log.lines().count() > 20, "{log}");
    for line in log.lines() {
        assert!(!leaks(line), "a secret in a log line: {line}");
    }
    for output in [&verified, &status] {
        assert!(!leaks(output), "a secret in command output: {output}");
    }
    // pg_dump's service file (the key's password) is gone.
    let left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("decant-pg_dump-{}-", migrate.id())))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Errors: a bad percent-escape in the password, a password with a
    // space and no quotes, a wrong password, a TOML error on the dsn line.
    let bad_uri = source_dsn.replace("%2F", "%zz");
    let unquoted = dest_dsn.replace(&format!("'{PASSWORD}'"), PASSWORD);
    let wrong = dest_dsn.replace("Zq7-", "Zq7-wrong-");
    let cases = [
        ("bad-escape.toml", task(&bad_uri, &dest_dsn), "bad percent-encoding in the password (not shown)"),
        ("unquoted.toml", task(&source_dsn, &unquoted), "a value with spaces must be quoted: password='...'"),
        ("wrong.toml", task(&source_dsn, &wrong), "password authentication failed"),
        ("toml-error.toml", task(&source_dsn, &dest_dsn).replacen("'\"\n", "'\n", 1), "password=********"),
    ];
    for (name, text, message) in cases {
        let config = write(dir.path(), name, &text);
        for args in [&["verify"][..], &["migrate"][..]] {
            let (ok, out) = command(&config, args);
            assert!(!ok, "{name} {args:?}: {out}");
            assert!(out.contains(message), "{name} {args:?}: missing {message:?} in:\n{out}");
            assert!(!leaks(&out), "{name} {args:?}: a secret in the error:\n{out}");
        }
    }
}

#[test]
fn a_copy_range_read_back_from_the_destination_is_never_run_as_sql() {
    // No slot name, heartbeats or status interval: a copy alone, slowly.
    let t = Task::builder(decant(), "c")
        .unset("source.slot")
        .unset("source.heartbeat_seconds")
        .unset("agent.status_interval_seconds")
        .migrate("types = [\"schema\", \"full\"]\nsplit_tables_larger_than_mb = 2\nmax_mb_per_second = 1")
        .build();
    let mut src = t.source.connect();
    src.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, 120000) g;
         CREATE FUNCTION evil() RETURNS bool LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'evil() ran on the source'; END$$;",
    )
    .unwrap();
    let mut d = t.dest.connect();
    let ranges = |c: &mut postgres::Client| -> (i64, i64) {
        c.query_opt("SELECT count(*) FILTER (WHERE done_at IS NOT NULL), count(*) FROM decant.copy_range WHERE task_id = 'c'", &[])
            .ok()
            .flatten()
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, 0))
    };
    let mut m = t.migrate("migrate1.log");
    wait_for("part of the copy", Duration::from_secs(120), || {
        assert!(m.is_running(), "decant migrate ended:\n{}", m.log());
        let (done, total) = ranges(&mut d);
        done >= 1 && done + 2 < total
    });
    m.kill9();
    // The plan holds the ranges as page numbers, and no text.
    let text: i64 = d
        .query_one("SELECT count(*) FROM decant.copy_range WHERE condition <> '' OR (first_page IS NULL AND end_page IS NULL)", &[])
        .unwrap()
        .get(0);
    assert_eq!(text, 0);
    // Make the destination what a version that kept ranges as text left
    // behind (conditions only, no page columns) ...
    d.batch_execute(
        "DO $$BEGIN
             IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.copy_range'::regclass AND attname = 'end_page') THEN
                 UPDATE decant.copy_range SET condition = concat_ws(' AND ', 'ctid >= ''(' || first_page || ',0)''',
                                                                 'ctid < ''(' || end_page || ',0)''');
                 ALTER TABLE decant.copy_range DROP COLUMN first_page, DROP COLUMN end_page;
             END IF;
         END$$",
    )
    .unwrap();
    // ... and write SQL into an unfinished range's condition.
    let row = d
        .query_one(
            "SELECT range_id, condition FROM decant.copy_range WHERE done_at IS NULL AND condition <> '' ORDER BY range_id LIMIT 1",
            &[],
        )
        .unwrap();
    let (range, condition): (i32, String) = (row.get(0), row.get(1));
    assert!(condition.starts_with("ctid "), "{condition}");
    d.execute("UPDATE decant.copy_range SET condition = 'evil()' WHERE range_id = $1", &[&range]).unwrap();
    let out = fails(&mut t.migrate("migrate2.log"));
    let refusal = format!("decant.copy_range holds a condition that is no page range for range {range} of table public.big");
    expect(&out, &[refusal.as_str(), "DROP SCHEMA decant CASCADE"]);
    assert!(!out.contains("evil() ran"), "{out}");
    // The old conditions, read as page numbers, finish the copy.
    d.execute("UPDATE decant.copy_range SET condition = $2 WHERE range_id = $1", &[&range, &condition]).unwrap();
    let mut m = t.migrate("migrate3.log");
    assert_eq!(m.wait_exit(Duration::from_secs(180)), Some(0), "{}", m.log());
    let (done, total) = ranges(&mut d);
    assert!(total > 2 && done == total, "{done} of {total} ranges done");
    let count = |c: &mut postgres::Client| -> (i64, i64) {
        let r = c.query_one("SELECT count(*), count(DISTINCT id) FROM big", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(count(&mut d), (120000, 120000));
    assert_eq!(count(&mut src), (120000, 120000));
    let (ok, out) = t.command(&["verify"]);
    assert!(ok && out.contains("tables equal"), "{out}");
}
