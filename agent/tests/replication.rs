//! The streaming replication client against real servers: authentication
//! methods, slot commands, streaming and status updates.

use decant_agent::connect::clock::pg_now;
use decant_agent::connect::{ConnInfo, ProcessEnv};
use decant_agent::replication::messages::StatusUpdate;
use decant_agent::replication::{ReplicationClient, ReplicationError, Streamed};
use decant_proto::{decode, Lsn, Record};
use decant_tests::Cluster;

fn info(conninfo: &str) -> ConnInfo {
    ConnInfo::parse(conninfo, &ProcessEnv).expect("conninfo")
}

/// Replaces pg_hba.conf with `lines` and reloads.
fn set_hba(cluster: &Cluster, lines: &str) {
    std::fs::write(cluster.data_dir().join("pg_hba.conf"), lines).unwrap();
    cluster.connect().batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
}

async fn sql_client(cluster: &Cluster) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&cluster.conninfo("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn authenticates_with_trust_password_md5_and_scram() {
    let cluster = Cluster::start();
    let mut admin = cluster.connect();
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 secret';
             SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram secret';
             CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain secret';",
        )
        .unwrap();
    set_hba(
        &cluster,
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication postgres 127.0.0.1/32 trust\n\
         host all,replication md5_user 127.0.0.1/32 md5\n\
         host all,replication scram_user 127.0.0.1/32 scram-sha-256\n\
         host all,replication plain_user 127.0.0.1/32 password\n",
    );
    let base = format!("host=127.0.0.1 port={} dbname=postgres sslmode=disable", cluster.port());
    runtime().block_on(async {
        for (user, password) in [
            ("postgres", None),
            ("md5_user", Some("md5 secret")),
            ("scram_user", Some("scram secret")),
            ("plain_user", Some("plain secret")),
        ] {
            let conninfo = match password {
                Some(p) => format!("{base} user={user} password='{p}'"),
                None => format!("{base} user={user}"),
            };
            let mut client = ReplicationClient::connect(&info(&conninfo), "decant-test").await.unwrap_or_else(|e| panic!("{user}: {e}"));
            assert!(client.server_version() >= 100000);
            let id = client.identify_system().await.unwrap();
            assert_eq!(id.database.as_deref(), Some("postgres"));
            client.close().await;
        }
        let wrong = ReplicationClient::connect(&info(&format!("{base} user=scram_user password=wrong")), "t")
            .await
            .err()
            .expect("wrong password accepted");
        assert_eq!(wrong.code(), Some("28P01"), "{wrong}");
        assert!(wrong.to_string().contains("password authentication failed"), "{wrong}");
        let missing = ReplicationClient::connect(&info(&format!("{base} user=md5_user")), "t").await.err().unwrap();
        assert!(matches!(missing, ReplicationError::PasswordNeeded(_)), "{missing}");
        // No server there: a connection error naming the target.
        let nobody = ReplicationClient::connect(&info("host=127.0.0.1 port=1 user=x sslmode=disable"), "t").await.err().unwrap();
        assert!(nobody.is_connection_loss() && nobody.to_string().contains("127.0.0.1:1"), "{nobody}");
    });
}

#[test]
fn creates_a_slot_streams_records_and_confirms_progress() {
    let cluster = Cluster::start();
    let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", cluster.port());
    runtime().block_on(async {
        let admin = sql_client(&cluster).await;
        admin.batch_execute("CREATE EXTENSION decant; CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
        let mut client = ReplicationClient::connect(&info(&conninfo), "decant-test").await.unwrap();
        let slot = client.create_logical_slot("s", "decant", true).await.unwrap();
        assert!(slot.snapshot.is_some());
        // The exported snapshot is importable while the connection is open.
        let reader = sql_client(&cluster).await;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{}'; COMMIT",
                slot.snapshot.as_deref().unwrap()
            ))
            .await
            .unwrap();

        admin.batch_execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')").await.unwrap();
        let mut stream = ReplicationClient::connect(&info(&conninfo), "decant-test").await.unwrap();
        stream.start_replication("s", slot.consistent_point, &[("include_messages", "off".to_string())]).await.unwrap();
        let mut kinds = Vec::new();
        let mut end = Lsn(0);
        while kinds.last() != Some(&"COMMIT") {
            match stream.recv().await.unwrap() {
                Streamed::Data { payload, .. } => {
                    let (record, _) = decode(&payload).unwrap();
                    if let Record::Commit(c) = &record {
                        end = c.end_lsn;
                    }
                    kinds.push(record.kind().name());
                }
                Streamed::Keepalive { reply_requested: true, wal_end, .. } => {
                    stream
                        .send_status(StatusUpdate {
                            written: wal_end,
                            flushed: Lsn(0),
                            applied: Lsn(0),
                            clock: pg_now(),
                            reply_requested: false,
                        })
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
        assert_eq!(kinds, ["BEGIN", "RELATION", "INSERT", "INSERT", "COMMIT"]);
        stream
            .send_status(StatusUpdate { written: end, flushed: end, applied: end, clock: pg_now(), reply_requested: true })
            .await
            .unwrap();
        // The confirmation reaches the slot.
        let mut confirmed = String::new();
        for _ in 0..50 {
            confirmed = admin
                .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'", &[])
                .await
                .unwrap()
                .get(0);
            if confirmed.parse::<Lsn>().unwrap() >= end {
                break;
            }
            // Keep reading so the server processes the update.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), stream.recv()).await;
        }
        assert_eq!(confirmed.parse::<Lsn>().unwrap(), end);
        // A slot in use is refused to a second consumer with a clear error.
        let mut second = ReplicationClient::connect(&info(&conninfo), "decant-test").await.unwrap();
        let busy = second.start_replication("s", Lsn(0), &[]).await.unwrap_err();
        assert_eq!(busy.code(), Some("55006"), "{busy}");
        // Bad plugin options are errors naming the option.
        drop(stream);
        let mut third = ReplicationClient::connect(&info(&conninfo), "decant-test").await.unwrap();
        let started = third.start_replication("s", Lsn(0), &[("bogus", "1".to_string())]).await;
        let err = match started {
            Err(e) => e,
            Ok(()) => third.recv().await.unwrap_err(),
        };
        assert!(err.to_string().contains("\"bogus\": unknown option"), "{err}");
        client.drop_slot("s").await.unwrap_or_else(|e| panic!("{e}"));
    });
}

/// TLS to the source: sslmode semantics, certificate checks, client
/// certificates (with an encrypted key), and SCRAM channel binding.
#[test]
fn tls_modes_client_certificates_and_channel_binding() {
    use decant_tests::certs::Certs;
    let certs = Certs::new("cert_user");
    let cluster = Cluster::start();
    let mut admin = cluster.connect();
    for line in certs.install_in_server(cluster.data_dir()) {
        let (k, v) = line.split_once(" = ").unwrap();
        admin.batch_execute(&format!("ALTER SYSTEM SET {k} = {v}")).unwrap();
    }
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram secret';
             CREATE ROLE cert_user LOGIN REPLICATION;",
        )
        .unwrap();
    set_hba(
        &cluster,
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         hostssl all,replication scram_user 127.0.0.1/32 scram-sha-256\n\
         hostssl all,replication cert_user 127.0.0.1/32 cert\n",
    );
    let base = format!("host=localhost port={} dbname=postgres", cluster.port());
    let ca = certs.ca.display().to_string();
    let scram = format!("{base} user=scram_user password='scram secret'");
    runtime().block_on(async {
        let ssl_in_use = |mut c: ReplicationClient| async move {
            let rows = c.simple_query("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await.unwrap();
            c.close().await;
            rows[0][0].clone()
        };
        // verify-full against the right CA; SCRAM-SHA-256-PLUS binds the channel.
        let c = ReplicationClient::connect(&info(&format!("{scram} sslmode=verify-full sslrootcert={ca}")), "t").await.unwrap();
        assert_eq!(ssl_in_use(c).await.as_deref(), Some("true"));
        // require, prefer: encrypted too.
        for mode in ["require", "prefer"] {
            let c =
                ReplicationClient::connect(&info(&format!("{scram} sslmode={mode}")), "t").await.unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert_eq!(ssl_in_use(c).await.as_deref(), Some("true"), "{mode}");
        }
        // The wrong CA is refused.
        let other = certs.other_ca.display().to_string();
        let err = ReplicationClient::connect(&info(&format!("{scram} sslmode=verify-full sslrootcert={other}")), "t").await.err().unwrap();
        assert!(matches!(err, ReplicationError::TlsHandshake { .. }), "{err}");
        // verify-full without a root certificate is a configuration error.
        let err = ReplicationClient::connect(&info(&format!("{scram} sslmode=verify-full sslrootcert=/nonexistent/root.crt")), "t")
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/root.crt"), "{err}");
        // Without TLS, hostssl lines do not match.
        let err = ReplicationClient::connect(&info(&format!("{scram} sslmode=disable")), "t").await.err().unwrap();
        assert_eq!(err.code(), Some("28000"), "{err}");
        // Client certificate authentication, with an encrypted key.
        let cert = certs.client_cert.display().to_string();
        let key = certs.client_key_encrypted.display().to_string();
        std::fs::set_permissions(&certs.client_key_encrypted, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let with_cert = format!("{base} user=cert_user sslmode=verify-full sslrootcert={ca} sslcert={cert} sslkey={key}");
        let c = ReplicationClient::connect(&info(&format!("{with_cert} sslpassword='{}'", Certs::KEY_PASSWORD)), "t").await.unwrap();
        assert_eq!(ssl_in_use(c).await.as_deref(), Some("true"));
        let err = ReplicationClient::connect(&info(&format!("{with_cert} sslpassword=wrong")), "t").await.err().unwrap();
        assert!(err.to_string().contains("cannot decrypt"), "{err}");
        let err = ReplicationClient::connect(&info(&with_cert), "t").await.err().unwrap();
        assert!(err.to_string().contains("sslpassword"), "{err}");
    });
}
