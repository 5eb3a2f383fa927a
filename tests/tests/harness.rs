//! Self-test of the throwaway-cluster harness.

use decant_tests::Cluster;

fn show(client: &mut postgres::Client, param: &str) -> String {
    client.query_one(&format!("SHOW {param}"), &[]).unwrap_or_else(|e| panic!("SHOW {param}: {e}")).get(0)
}

#[test]
fn two_clusters_restart_and_cleanup() {
    // Start two clusters concurrently.
    let a = std::thread::spawn(Cluster::start);
    let b = std::thread::spawn(|| Cluster::start_with(&["max_wal_senders = 30"]));
    let a = a.join().expect("cluster a failed to start");
    let b = b.join().expect("cluster b failed to start");

    assert_ne!(a.port(), b.port(), "clusters share a port");
    assert_ne!(a.data_dir(), b.data_dir());
    assert_eq!(a.host(), "127.0.0.1");
    assert_eq!(a.conninfo("db1"), format!("host=127.0.0.1 port={} user=postgres dbname=db1", a.port()));
    assert!(a.bindir().join("pg_ctl").exists());

    for c in [&a, &b] {
        let mut client = c.connect();
        assert_eq!(show(&mut client, "wal_level"), "logical");
        assert_eq!(show(&mut client, "listen_addresses"), "127.0.0.1");
        assert_eq!(show(&mut client, "port"), c.port().to_string());
        // If this server build has output_plugin_libraries, decant must be allowed.
        let opl: Option<String> =
            client.query_opt("SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'", &[]).unwrap().map(|r| r.get(0));
        if let Some(opl) = opl {
            assert!(opl.contains("decant"), "output_plugin_libraries = {opl:?}");
        }
    }
    // Extra conf lines override the defaults.
    assert_eq!(show(&mut a.connect(), "max_wal_senders"), "20");
    assert_eq!(show(&mut b.connect(), "max_wal_senders"), "30");

    // connect_db to another database.
    a.connect().batch_execute("CREATE DATABASE other; ").unwrap();
    let mut other = a.connect_db("other");
    let db: String = other.query_one("SELECT current_database()", &[]).unwrap().get(0);
    assert_eq!(db, "other");
    drop(other);

    // Data survives a restart; the server comes back on the same port.
    let mut client = a.connect();
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);").unwrap();
    let started_before: String = client.query_one("SELECT pg_postmaster_start_time()::text", &[]).unwrap().get(0);
    drop(client);
    a.restart();
    let mut client = a.connect();
    let started_after: String = client.query_one("SELECT pg_postmaster_start_time()::text", &[]).unwrap().get(0);
    assert_ne!(started_before, started_after, "server did not restart");
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    assert_eq!(show(&mut client, "wal_level"), "logical");
    drop(client);

    assert!(!a.log().is_empty() || a.data_dir().exists());

    // A logical slot can be created (wal_level/max_replication_slots are right).
    let mut client = b.connect();
    client.query_one("SELECT lsn::text FROM pg_create_logical_replication_slot('harness_slot', 'test_decoding')", &[]).unwrap();
    drop(client);

    // After drop the data dir is gone (and the server stopped).
    let (a_dir, b_dir, a_port) = (a.data_dir().to_path_buf(), b.data_dir().to_path_buf(), a.port());
    drop(a);
    drop(b);
    assert!(!a_dir.exists(), "{} still exists", a_dir.display());
    assert!(!b_dir.exists(), "{} still exists", b_dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", a_port)).is_err(), "server still listening on {a_port}");
}

#[test]
fn replication_connection_allowed_by_hba() {
    let c = Cluster::start();
    let hba = std::fs::read_to_string(c.data_dir().join("pg_hba.conf")).unwrap();
    assert!(hba.lines().any(|l| {
        let t: Vec<&str> = l.split_whitespace().collect();
        t.len() >= 5 && t[..5] == ["host", "replication", "all", "127.0.0.1/32", "trust"]
    }));
}
