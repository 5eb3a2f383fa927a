//! Bad input gives one clear error naming the object and the fix, and a
//! non-zero exit; never a panic.

use std::path::Path;
use std::time::Duration;

use decant_tests::process::{expect, fails, free_port, Role};
use decant_tests::task::Config;
use decant_tests::Cluster;

struct Setup {
    dir: tempfile::TempDir,
    /// Applier port of the last configuration written.
    port: std::cell::Cell<u16>,
}

impl Setup {
    fn new() -> Setup {
        Setup { dir: tempfile::tempdir().unwrap(), port: std::cell::Cell::new(0) }
    }

    /// Task `e` between `source` and `destination`, agent and applier on
    /// a new free port; no heartbeats.
    fn config(&self, source: &str, destination: &str) -> std::path::PathBuf {
        let port = free_port();
        self.port.set(port);
        Config::empty("e")
            .dsns(source, destination)
            .set("source.heartbeat_seconds", "0")
            .set("agent.applier_url", &format!("\"http://127.0.0.1:{port}\""))
            .set("agent.metrics_listen", "\"\"")
            .set("transport.token", "\"errors test\"")
            .set("applier.listen", &format!("\"127.0.0.1:{port}\""))
            .set("applier.metrics_listen", "\"\"")
            .write(&self.dir.path().join(format!("task-{port}.toml")))
    }

    fn role(&self, name: &str, config: &Path, overrides: &[&str]) -> Role {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let log = self.dir.path().join(format!("{name}-{}.log", free_port()));
        let role = Role::start_with(Path::new(env!("CARGO_BIN_EXE_decant")), name, config, &overrides, &log);
        if name == "applier" {
            decant_tests::process::wait_port(self.port.get());
        }
        role
    }
}

#[test]
fn configuration_and_source_errors() {
    let s = Setup::new();
    let good_dest = Cluster::start();
    let dest = good_dest.conninfo("postgres");

    // A bad configuration value.
    let cfg = s.config("host=127.0.0.1", &dest);
    expect(&fails(&mut s.role("agent", &cfg, &["retry.other_minutes=0"])), &["retry.other_minutes", "between 1 and 1440"]);
    expect(&fails(&mut s.role("agent", &cfg, &["source.slott=\"x\""])), &["unknown field `slott`"]);

    // An unreachable source.
    let cfg = s.config("host=127.0.0.1 port=1 user=postgres", &dest);
    expect(&fails(&mut s.role("agent", &cfg, &[])), &["cannot connect to 127.0.0.1:1"]);

    // Wrong password.
    let source = Cluster::start();
    source
        .connect()
        .batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN REPLICATION PASSWORD 'right'")
        .unwrap();
    std::fs::write(
        source.data_dir().join("pg_hba.conf"),
        "local all all trust\nhost all,replication postgres 127.0.0.1/32 trust\nhost all,replication app 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    source.connect().batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let cfg = s.config(&format!("host=127.0.0.1 port={} user=app password=wrong dbname=postgres", source.port()), &dest);
    expect(&fails(&mut s.role("agent", &cfg, &[])), &["password authentication failed for user \"app\"", "28P01"]);

    // A missing slot, with slot creation off.
    let cfg = s.config(&source.conninfo("postgres"), &dest);
    let mut applier = s.role("applier", &cfg, &[]);
    expect(
        &fails(&mut s.role("agent", &cfg, &["source.create_slot=false", "source.slot=\"nope\""])),
        &["slot \"nope\"", "does not exist", "create_slot"],
    );

    // A slot of another plugin than the one source.decoder names.
    source.connect().batch_execute("SELECT pg_create_logical_replication_slot('td', 'test_decoding')").unwrap();
    expect(
        &fails(&mut s.role("agent", &cfg, &["source.slot=\"td\"", "source.decoder=\"decant\""])),
        &["slot \"td\"", "output plugin test_decoding", "source.decoder", "fixed when it is created"],
    );
    applier.kill9();

    // wal_level not logical.
    let replica = Cluster::start_with(&["wal_level = replica"]);
    let cfg = s.config(&replica.conninfo("postgres"), &dest);
    let _applier = s.role("applier", &cfg, &[]);
    expect(&fails(&mut s.role("agent", &cfg, &[])), &["wal_level"]);

    // The plugin not allowed by output_plugin_libraries (where the server has it).
    let restricted = Cluster::start_with(&[]);
    let known: bool =
        restricted.connect().query_one("SELECT count(*) = 1 FROM pg_settings WHERE name = 'output_plugin_libraries'", &[]).unwrap().get(0);
    if known {
        let mut c = restricted.connect();
        c.batch_execute("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'").unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let cfg = s.config(&restricted.conninfo("postgres"), &dest);
        let _applier = s.role("applier", &cfg, &[]);
        // decant asked for by name (auto would choose pgoutput here).
        expect(&fails(&mut s.role("agent", &cfg, &["source.decoder=\"decant\""])), &["decant", "output_plugin_libraries"]);
    }
}

#[test]
fn applier_and_stream_errors() {
    let s = Setup::new();
    let source = Cluster::start();
    let dest = Cluster::start();
    // A wrong destination database: the applier stops at start.
    let cfg = s.config(&source.conninfo("postgres"), &dest.conninfo("no_such_db"));
    let log = s.dir.path().join("bad-applier.log");
    let mut bad = Role::start_with(Path::new(env!("CARGO_BIN_EXE_decant")), "applier", &cfg, &[], &log);
    expect(&fails(&mut bad), &["no_such_db", "does not exist"]);

    // No applier listening: the agent stops at start, naming it.
    let cfg = s.config(&source.conninfo("postgres"), &dest.conninfo("postgres"));
    expect(&fails(&mut s.role("agent", &cfg, &[])), &["cannot reach the applier at http://127.0.0.1:"]);

    // A destination table that does not exist: reported with the fix.
    source.connect().batch_execute("CREATE TABLE only_on_source (id int PRIMARY KEY)").unwrap();
    let mut applier = s.role("applier", &cfg, &[]);
    let mut agent = s.role("agent", &cfg, &["retry.other_minutes=1"]);
    let mut c = source.connect();
    decant_tests::process::wait_for("the agent to stream", Duration::from_secs(30), || {
        c.query_one("SELECT count(*) FROM pg_replication_slots WHERE active", &[]).unwrap().get::<_, i64>(0) == 1
    });
    c.batch_execute("INSERT INTO only_on_source VALUES (1)").unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !applier.log().contains("public.only_on_source does not exist") && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(applier.log().contains("does not exist"), "applier:\n{}\nagent:\n{}", applier.log(), agent.log());
    expect(&applier.log(), &["destination table public.only_on_source does not exist", "create it"]);
    expect(&agent.log(), &["public.only_on_source does not exist"]);
    agent.kill9();
    applier.kill9();
}

/// A batch with a corrupt record is refused as a whole with a clear error;
/// what was committed before it stays.
#[test]
fn a_crc_mismatch_stops_the_stream_and_applies_nothing_of_the_batch() {
    use decant_agent::transport::client::open;
    use decant_agent::transport::TransportSettings;
    use decant_proto::grpc::{agent_message::Body, AgentMessage, Hello, RecordBatch};
    use decant_proto::*;

    let s = Setup::new();
    let dest = Cluster::start();
    dest.connect().batch_execute("CREATE TABLE t (id int PRIMARY KEY)").unwrap();
    let cfg = s.config("host=127.0.0.1", &dest.conninfo("postgres"));
    let _applier = s.role("applier", &cfg, &[]);
    let config = decant_agent::config::Config::load(Some(&cfg), &[]).unwrap();
    let transaction = |id: i64, lsn: u64| {
        let mut buf = Vec::new();
        encode(&Record::Begin(Begin { xid: 1, final_lsn: Lsn(lsn), commit_time: 0 }), &mut buf);
        encode(
            &Record::Relation(Relation {
                oid: 1,
                namespace: b"public",
                name: b"t",
                replica_identity: ReplicaIdentity::Default,
                columns: vec![Column { name: b"id", type_oid: 23, typmod: -1, type_name: b"integer", flags: ColumnFlags(3) }],
            }),
            &mut buf,
        );
        encode(&Record::Insert(Insert { relation: 1, new: Tuple(vec![Value::Int(id)]) }), &mut buf);
        encode(&Record::Commit(Commit { end_lsn: Lsn(lsn + 8), commit_time: 0 }), &mut buf);
        buf
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let hello = Hello { task_id: "e".into(), format_version: FORMAT_VERSION.into(), ..Default::default() };
        let mut stream = open(&config.agent.applier_url, &TransportSettings::from_config(&config).unwrap(), hello, 4).await.unwrap();
        let batch = |sequence: u64, records: Vec<u8>| AgentMessage {
            body: Some(Body::Batch(RecordBatch { sequence, count: 4, records: records.into(), ..Default::default() })),
        };
        stream.outbound.send(batch(1, transaction(1, 100))).await.unwrap();
        // Batch 1 is committed (and durable) before batch 2 is sent.
        loop {
            let m = stream.inbound.message().await.unwrap().unwrap();
            if let Some(decant_proto::grpc::applier_message::Body::Ack(a)) = m.body {
                if a.committed_lsn == 108 {
                    break;
                }
            }
        }
        let mut corrupt = transaction(2, 200);
        let at = corrupt.len() - 20;
        corrupt[at] ^= 0x01;
        stream.outbound.send(batch(2, corrupt)).await.unwrap();
        let status = loop {
            match stream.inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        assert!(status.message().contains("CRC mismatch") && status.message().contains("batch 2"), "{}", status.message());
        assert!(status.message().contains("nothing of this batch was applied"), "{}", status.message());
    });
    let ids: Vec<i32> = dest.connect().query("SELECT id FROM t ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1]);
}

/// With on_conflict = stop, a change that does not fit the destination's
/// rows stops the stream with the table named, and nothing of it is applied.
#[test]
fn the_stop_policy_reports_a_conflict_and_applies_nothing() {
    let s = Setup::new();
    let source = Cluster::start();
    let dest = Cluster::start();
    for c in [&source, &dest] {
        c.connect().batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").unwrap();
    }
    dest.connect().batch_execute("INSERT INTO t VALUES (1, 'already here')").unwrap();
    let cfg = s.config(&source.conninfo("postgres"), &dest.conninfo("postgres"));
    let applier = s.role("applier", &cfg, &["applier.on_conflict=\"stop\""]);
    let _agent = s.role("agent", &cfg, &["retry.other_minutes=1"]);
    let mut c = source.connect();
    decant_tests::process::wait_for("the agent to stream", Duration::from_secs(30), || {
        c.query_one("SELECT count(*) FROM pg_replication_slots WHERE active", &[]).unwrap().get::<_, i64>(0) == 1
    });
    c.batch_execute("INSERT INTO t VALUES (2, 'fits'), (1, 'conflicts')").unwrap();
    decant_tests::process::wait_for("the conflict to be reported", Duration::from_secs(30), || applier.log().contains("duplicate key"));
    expect(&applier.log(), &["INSERT on public.t failed", "duplicate key value violates unique constraint"]);
    let rows: Vec<(i32, String)> =
        dest.connect().query("SELECT id, v FROM t ORDER BY id", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [(1, "already here".to_string())]);
}
