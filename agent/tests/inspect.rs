//! `decant inspect` against a real slot and a real `pg_recvlogical` file.

use std::path::Path;
use std::process::{Command, Output};

use decant_tests::slot::prepare_source;
use decant_tests::Cluster;

fn decant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_decant")).args(args).output().expect("run decant")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "decant failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn source() -> (Cluster, postgres::Client) {
    let cluster = Cluster::start();
    let mut client = cluster.connect();
    prepare_source(&mut client, "s");
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, price numeric, note text, at timestamptz)").unwrap();
    client.batch_execute("INSERT INTO t VALUES (1, 12.50, 'a ''quoted'' note', '2024-01-02 03:04:05+00'), (2, NULL, NULL, NULL)").unwrap();
    client.batch_execute("UPDATE t SET note = 'x' WHERE id = 2").unwrap();
    client.batch_execute("DELETE FROM t WHERE id = 1").unwrap();
    client.batch_execute("SELECT pg_logical_emit_message(true, 'app', 'hello')").unwrap();
    (cluster, client)
}

const EXPECTED_JSON: &[&str] = &[
    r#""kind":"relation""#,
    r#""new":{"id":"1","price":"12.50","note":"a 'quoted' note","at":"2024-01-02 03:04:05+00"}"#,
    r#""new":{"id":"2","price":null,"note":null,"at":null}"#,
    r#""new":{"id":"2","price":null,"note":"x","at":null}"#,
    r#""kind":"delete","relation""#,
    r#""old_key":{"id":"1"}"#,
    r#""prefix":"app","content":"hello""#,
];

#[test]
fn inspects_a_slot_without_consuming_it() {
    let (cluster, mut client) = source();
    let dsn = cluster.conninfo("postgres");
    let text = stdout(&decant(&["inspect", "--slot", "s", "--dsn", &dsn]));
    assert!(text.contains("INSERT public.t: id=1 price=12.50 note='a ''quoted'' note' at='2024-01-02 03:04:05+00'"), "{text}");
    assert!(text.contains("DELETE public.t: key id=1"), "{text}");
    let json = stdout(&decant(&["inspect", "--slot", "s", "--dsn", &dsn, "--json"]));
    for want in EXPECTED_JSON {
        assert!(json.contains(want), "missing {want} in\n{json}");
    }
    for line in json.lines() {
        serde_json_check(line);
    }
    // Peeking consumed nothing.
    let pending: i64 = client.query_one("SELECT count(*) FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL)", &[]).unwrap().get(0);
    assert_eq!(pending as usize, json.lines().count());
    // Options go to the plugin, and are checked before connecting.
    let no_messages = stdout(&decant(&["inspect", "--slot", "s", "--dsn", &dsn, "-o", "include_messages=off"]));
    assert!(!no_messages.contains("MESSAGE"));
    let bad = decant(&["inspect", "--slot", "s", "--dsn", &dsn, "-o", "include_mesages=off"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("\"include_mesages\": unknown option"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

fn serde_json_check(line: &str) {
    assert!(line.starts_with('{') && line.ends_with('}'), "not a JSON object line: {line}");
}

fn recvlogical(cluster: &Cluster, client: &mut postgres::Client, file: &Path) {
    recvlogical_with(cluster, client, file, &[]);
}

fn recvlogical_with(cluster: &Cluster, client: &mut postgres::Client, file: &Path, options: &[&str]) {
    let end: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let out = Command::new(cluster.bindir().join("pg_recvlogical"))
        .args(["-h", cluster.host(), "-p", &cluster.port().to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["--slot", "s", "--start", "--no-loop", "--endpos", &end])
        .args(options.iter().flat_map(|o| ["-o", o]))
        .arg("-f")
        .arg(file)
        .output()
        .expect("run pg_recvlogical");
    assert!(out.status.success(), "pg_recvlogical: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn inspects_a_pg_recvlogical_file_and_reports_corruption_with_its_offset() {
    let (cluster, mut client) = source();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("changes.bin");
    recvlogical(&cluster, &mut client, &file);
    let path = file.to_str().unwrap();
    let json = stdout(&decant(&["inspect", "--file", path, "--json"]));
    for want in EXPECTED_JSON {
        assert!(json.contains(want), "missing {want} in\n{json}");
    }
    let summary = stdout(&decant(&["inspect", "--file", path, "--summary"]));
    assert!(summary.contains("INSERT     2") && summary.contains("UPDATE     1") && summary.contains("DELETE     1"), "{summary}");

    let bytes = std::fs::read(&file).unwrap();
    // A flipped bit in the middle: a CRC mismatch (or a broken frame), with an offset.
    let mut corrupt = bytes.clone();
    corrupt[bytes.len() / 2] ^= 0x10;
    let bad = dir.path().join("corrupt.bin");
    std::fs::write(&bad, &corrupt).unwrap();
    let out = decant(&["inspect", "--file", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("byte offset"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Cut short: a truncation error with an offset, never a panic.
    for cut in [1, bytes.len() / 3, bytes.len() - 2] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let out = decant(&["inspect", "--file", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("byte offset") && !err.contains("panicked"), "cut {cut}: {err}");
    }
    // Not a pg_recvlogical file of decant records at all.
    std::fs::write(&bad, b"BEGIN 123\ntable public.t: INSERT: id[integer]:1\n").unwrap();
    let out = decant(&["inspect", "--file", bad.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("byte offset 0"));
}

#[test]
fn inspects_a_file_of_packed_messages() {
    let (cluster, mut client) = source();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packed.bin");
    recvlogical_with(&cluster, &mut client, &file, &["max_message_bytes=1024"]);
    let json = stdout(&decant(&["inspect", "--file", file.to_str().unwrap(), "--json"]));
    for want in EXPECTED_JSON {
        assert!(json.contains(want), "missing {want} in\n{json}");
    }
}
