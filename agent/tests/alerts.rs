//! `[alert]` end to end: a real agent and applier, alerts POSTed to a
//! receiver run by the test and written to files by a command. Lag fires
//! once and resolves; a lost applier fires `failure` and resolves when the
//! stream works again; an agent that cannot get its slot fires `failure`
//! and then `retries_exhausted` as it gives up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use decant_tests::certs::Certs;
use decant_tests::process::{free_port, wait_for, Role};
use decant_tests::task::{Config, Task};
use serde_json::Value;

/// One POST received: (path, body as JSON).
type Received = (String, Value);

/// Reads one POST from `stream`, answers 200 and returns it.
fn read_post(stream: impl Read + Write) -> Received {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    assert!(request_line.starts_with("POST "), "{request_line}");
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut stream = reader.into_inner();
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = stream.flush();
    (path, serde_json::from_slice(&body).unwrap())
}

/// Serves POSTs on a free loopback port, one per connection, answering 200
/// (over TLS with `tls`); every one is sent to the returned channel.
fn receiver(tls: Option<Arc<rustls::ServerConfig>>) -> (u16, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let received = match &tls {
                None => read_post(stream),
                Some(config) => {
                    let connection = rustls::ServerConnection::new(config.clone()).unwrap();
                    let mut tls = rustls::StreamOwned::new(connection, stream);
                    // A client that refuses the certificate ends here.
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        continue;
                    }
                    read_post(tls)
                }
            };
            if tx.send(received).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// Every alert received so far, in order.
struct Alerts {
    rx: mpsc::Receiver<Received>,
    all: Vec<Received>,
}

impl Alerts {
    /// The (kind, state) of the alerts POSTed to `path`.
    fn at(&self, path: &str) -> Vec<(String, String)> {
        self.all
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| (v["kind"].as_str().unwrap().to_owned(), v["state"].as_str().unwrap().to_owned()))
            .collect()
    }

    /// Waits (up to `timeout`) for an alert of `kind` and `state` at `path`.
    fn wait(&mut self, path: &str, kind: &str, state: &str, timeout: Duration, roles: &[&Role]) -> Value {
        let until = Instant::now() + timeout;
        loop {
            if let Some((_, v)) = self.all.iter().find(|(p, v)| p == path && v["kind"] == kind && v["state"] == state) {
                return v.clone();
            }
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(r) => self.all.push(r),
                Err(_) if Instant::now() >= until => {
                    let logs: Vec<String> = roles.iter().map(|r| r.log()).collect();
                    panic!("no {kind} {state} alert at {path} within {timeout:?}; got {:?}\n{}", self.all, logs.join("\n-----\n"));
                }
                Err(_) => {}
            }
        }
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

#[test]
fn lag_failure_and_retries_exhausted_alerts() {
    let (receiver_port, rx) = receiver(None);
    let mut alerts = Alerts { rx, all: Vec::new() };
    // The command writes the JSON it reads and its environment, a line each
    // (into a dir of their own: the command is part of the configuration
    // the task's builder writes).
    let dir = tempfile::tempdir().unwrap();
    let command = |name: &str| {
        let base = dir.path().join(name);
        format!(
            "{{ cat; echo; }} >> {0}.json; echo \"$DECANT_TASK_ID $DECANT_ALERT_KIND $DECANT_ALERT_STATE $DECANT_ALERT_MESSAGE\" >> {0}.env",
            base.display()
        )
    };
    // Agent and applier, no [retry] (the agent's defaults) and no [migrate].
    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), "a")
        .transport("alerts test")
        .unset("retry")
        .unset("migrate")
        .set("alert.command", &format!("'{}'", command("main")))
        .set("alert.url", &format!("\"http://127.0.0.1:{receiver_port}/main\""))
        .set("alert.lag_bytes", "4000000")
        .build();
    let (source, dest) = (&t.source, &t.dest);
    let table = "CREATE TABLE t (id int PRIMARY KEY, pad text)";
    source.connect().batch_execute(&format!("CREATE EXTENSION decant; {table}")).unwrap();
    dest.connect().batch_execute(table).unwrap();
    let start = |role: &str, overrides: &[String]| {
        let log = format!("{role}-{}.log", free_port());
        if role == "applier" {
            t.applier(overrides, &log)
        } else {
            t.start_with(role, overrides, &log)
        }
    };
    let mut applier = start("applier", &[]);
    let agent = start("agent", &[]);
    let mut src = source.connect();
    let slot_active = |c: &mut postgres::Client| {
        c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'decant_a' AND active", &[]).unwrap().get::<_, i64>(0) == 1
    };
    wait_for("the agent to stream", Duration::from_secs(60), || slot_active(&mut src));

    // A second agent of the same slot cannot get it (an error retried for
    // retry.other_minutes) and gives up.
    let mut second = start(
        "agent",
        &[
            "retry.other_minutes=1".into(),
            format!("alert.url=\"http://127.0.0.1:{receiver_port}/second\""),
            format!("alert.command='{}'", command("second")),
            "alert.lag_bytes=0".into(),
        ],
    );

    // Lag: the destination table locked while the source writes ~20 MB.
    let mut lock = dest.connect();
    lock.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").unwrap();
    src.batch_execute("INSERT INTO t SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g").unwrap();
    let firing = alerts.wait("/main", "lag", "firing", Duration::from_secs(120), &[&agent, &applier]);
    assert_eq!(firing["task_id"], "a");
    assert_eq!(firing["threshold"], 4000000.0);
    assert!(firing["value"].as_f64().unwrap() >= 4000000.0, "{firing}");
    assert!(firing["message"].as_str().unwrap().contains("bytes"), "{firing}");
    assert!(firing["at"].as_str().unwrap().ends_with('Z'), "{firing}");
    lock.batch_execute("COMMIT").unwrap();
    alerts.wait("/main", "lag", "resolved", Duration::from_secs(120), &[&agent, &applier]);
    let mut dst = dest.connect();
    wait_for("the rows on the destination", Duration::from_secs(120), || {
        dst.query_one("SELECT count(*) FROM t", &[]).unwrap().get::<_, i64>(0) == 20000
    });
    assert_eq!(alerts.at("/main"), [("lag".into(), "firing".into()), ("lag".into(), "resolved".into())]);

    // The second agent: one failure, then retries exhausted, then it exits.
    alerts.wait("/second", "retries_exhausted", "firing", Duration::from_secs(240), &[&second]);
    let code = second.wait_exit(Duration::from_secs(60));
    assert!(code.is_some() && code != Some(0), "{code:?}\n{}", second.log());
    assert_eq!(alerts.at("/second"), [("failure".into(), "firing".into()), ("retries_exhausted".into(), "firing".into())]);
    let exhausted = alerts.all.iter().find(|(p, v)| p == "/second" && v["kind"] == "retries_exhausted").unwrap().1.clone();
    assert!(exhausted["message"].as_str().unwrap().contains("in use"), "{exhausted}");
    // The command got the same alerts, on stdin and in its environment.
    let json: Vec<Value> = lines(&dir.path().join("second.json")).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(json.iter().map(|v| v["kind"].as_str().unwrap()).collect::<Vec<_>>(), ["failure", "retries_exhausted"]);
    assert_eq!(json[1], exhausted);
    let env = lines(&dir.path().join("second.env"));
    assert_eq!(env.len(), 2, "{env:?}");
    assert!(env[0].starts_with("a failure firing ") && env[1].starts_with("a retries_exhausted firing "), "{env:?}");
    assert!(env[1].contains("in use"), "{env:?}");

    // Failure: the applier is lost; resolved once the stream works again.
    applier.kill9();
    let failure = alerts.wait("/main", "failure", "firing", Duration::from_secs(120), &[&agent]);
    assert!(failure["message"].as_str().unwrap().contains("session failed"), "{failure}");
    let mut applier = start("applier", &[]);
    wait_for("the agent to stream again", Duration::from_secs(120), || slot_active(&mut src));
    src.batch_execute("INSERT INTO t VALUES (0, 'after the failure')").unwrap();
    alerts.wait("/main", "failure", "resolved", Duration::from_secs(120), &[&agent, &applier]);
    assert_eq!(
        alerts.at("/main"),
        [
            ("lag".into(), "firing".into()),
            ("lag".into(), "resolved".into()),
            ("failure".into(), "firing".into()),
            ("failure".into(), "resolved".into())
        ]
    );
    let main: Vec<String> = lines(&dir.path().join("main.env"));
    assert_eq!(
        main.iter().map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>(),
        ["a lag firing", "a lag resolved", "a failure firing", "a failure resolved"]
    );
    applier.kill9();
    drop(agent);
}

/// HTTPS with `alert.ca_file`: an agent that cannot start (its source is
/// unreachable) fires `failure` before it exits; with a CA that did not
/// sign the receiver's certificate the POST fails, is logged, and the
/// agent stops with its own error all the same.
#[test]
fn https_with_a_ca() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = Certs::new("agent");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let (receiver_port, rx) = receiver(Some(Arc::new(tls)));
    let mut alerts = Alerts { rx, all: Vec::new() };
    let dir = tempfile::tempdir().unwrap();
    // An agent alone, its source unreachable.
    let config = Config::empty("h")
        .set("source.dsn", "\"host=127.0.0.1 port=1 user=postgres\"")
        .set("agent.metrics_listen", "\"\"")
        .set("transport.token", "\"alerts test\"")
        .set("alert.url", &format!("\"https://127.0.0.1:{receiver_port}/tls\""))
        .write(&dir.path().join("task.toml"));
    let bin = Path::new(env!("CARGO_BIN_EXE_decant"));
    let run = |ca: &Path| {
        let log = dir.path().join(format!("agent-{}.log", free_port()));
        let mut agent = Role::start_with(bin, "agent", &config, &[format!("alert.ca_file=\"{}\"", ca.display())], &log);
        let code = agent.wait_exit(Duration::from_secs(120));
        assert!(code.is_some() && code != Some(0), "{code:?}\n{}", agent.log());
        agent
    };
    let agent = run(&certs.ca);
    let alert = alerts.wait("/tls", "failure", "firing", Duration::from_secs(60), &[&agent]);
    assert_eq!(alert["task_id"], "h");
    assert!(alert["message"].as_str().unwrap().contains("cannot start"), "{alert}");
    let agent = run(&certs.other_ca);
    let log = agent.log();
    assert!(log.contains("alert POST failed") && log.contains("cannot connect to 127.0.0.1:1"), "{log}");
    assert_eq!(alerts.rx.recv_timeout(Duration::from_secs(1)).ok(), None, "nothing was received over an unverified connection");
}
