//! Throwaway certificates for TLS tests, made with the openssl command.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// `client_key` encrypted (PKCS#8, AES-256) with [`Certs::KEY_PASSWORD`].
    pub client_key_encrypted: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl must be installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certs {
    pub const KEY_PASSWORD: &'static str = "key pass";

    /// A CA, a server certificate for localhost/127.0.0.1 and a client
    /// certificate for `client_cn`, all signed by the CA; and an unrelated CA.
    pub fn new(client_cn: &str) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for ca in ["ca", "other_ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=decant test {ca}"),
                ],
            );
        }
        std::fs::write(d.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn) in [("server", "localhost"), ("client", client_cn)] {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.crt"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
        openssl(
            d,
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-256-cbc",
                "-in",
                "client.key",
                "-out",
                "client.enc.key",
                "-passout",
                &format!("pass:{}", Self::KEY_PASSWORD),
            ],
        );
        Certs {
            ca: d.join("ca.crt"),
            other_ca: d.join("other_ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            client_key_encrypted: d.join("client.enc.key"),
            _dir: dir,
        }
    }

    /// Copies the server certificate, key and CA into `data_dir` for
    /// PostgreSQL (which wants its key private to its own user) and returns
    /// the postgresql.conf lines that enable TLS.
    pub fn install_in_server(&self, data_dir: &Path) -> Vec<String> {
        for (from, to) in [(&self.server_cert, "server.crt"), (&self.server_key, "server.key"), (&self.ca, "root.crt")] {
            std::fs::copy(from, data_dir.join(to)).unwrap();
        }
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(data_dir.join("server.crt"))
            .arg(data_dir.join("server.key"))
            .arg(data_dir.join("root.crt"))
            .status();
        let _ = status; // not root: the files already belong to us
        let _ = Command::new("chmod").arg("600").arg(data_dir.join("server.key")).status();
        vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "ssl_ca_file = 'root.crt'".into(),
        ]
    }
}
