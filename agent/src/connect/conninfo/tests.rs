use super::*;
use std::collections::HashMap;

#[derive(Default)]
struct FakeEnv {
    vars: HashMap<&'static str, &'static str>,
    files: HashMap<PathBuf, String>,
}

impl Environment for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).map(|v| v.to_string())
    }
    fn home(&self) -> Option<PathBuf> {
        Some(PathBuf::from("/home/someone"))
    }
    fn os_user(&self) -> Option<String> {
        Some("someone".into())
    }
    fn read_file(&self, path: &Path) -> Option<String> {
        self.files.get(path).cloned()
    }
}

#[test]
fn keyword_value_form() {
    let c = ConnInfo::parse(
        "host=db.example port = 6543 user='o\\'neil' password='p w' dbname=app sslmode=verify-full sslrootcert=/ca.pem application_name=x",
        &FakeEnv::default(),
    )
    .unwrap();
    assert_eq!(c.host, Host::Tcp("db.example".into()));
    assert_eq!(c.port, 6543);
    assert_eq!(c.user, "o'neil");
    assert_eq!(c.password.as_deref(), Some("p w"));
    assert_eq!(c.dbname, "app");
    assert_eq!(c.sslmode, SslMode::VerifyFull);
    assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
}

#[test]
fn uri_form() {
    let c = ConnInfo::parse("postgresql://me:s%40cret@[::1]:5433/my%20db?sslmode=require&application_name=a", &FakeEnv::default()).unwrap();
    assert_eq!(c.host, Host::Tcp("::1".into()));
    assert_eq!(c.port, 5433);
    assert_eq!(c.user, "me");
    assert_eq!(c.password.as_deref(), Some("s@cret"));
    assert_eq!(c.dbname, "my db");
    assert_eq!(c.sslmode, SslMode::Require);
    let c = ConnInfo::parse("postgres:///db?host=/tmp/sock", &FakeEnv::default()).unwrap();
    assert_eq!(c.host, Host::Socket("/tmp/sock".into()));
}

#[test]
fn environment_and_defaults() {
    let env = FakeEnv { vars: HashMap::from([("PGHOST", "envhost"), ("PGPORT", "7777"), ("PGSSLMODE", "disable")]), ..Default::default() };
    let c = ConnInfo::parse("port=1234", &env).unwrap();
    assert_eq!((c.host.clone(), c.port, c.sslmode), (Host::Tcp("envhost".into()), 1234, SslMode::Disable));
    assert_eq!((c.user.as_str(), c.dbname.as_str()), ("someone", "someone"));
}

#[test]
fn password_file() {
    let mut env = FakeEnv::default();
    env.files.insert(
        PathBuf::from("/home/someone/.pgpass"),
        "# comment\nother:*:*:*:nope\ndb.example:5432:*:app:pa\\:ss\n*:*:*:*:fallback\n".into(),
    );
    let c = ConnInfo::parse("host=db.example user=app", &env).unwrap();
    assert_eq!(c.password.as_deref(), Some("pa:ss"));
    let c = ConnInfo::parse("host=elsewhere user=app", &env).unwrap();
    assert_eq!(c.password.as_deref(), Some("fallback"));
    let c = ConnInfo::parse("host=elsewhere user=app password=given", &env).unwrap();
    assert_eq!(c.password.as_deref(), Some("given"));
}

#[test]
fn errors_name_the_problem() {
    let env = FakeEnv::default();
    assert_eq!(ConnInfo::parse("hots=x", &env).unwrap_err(), ConnInfoError::UnknownOption("hots".into()));
    assert!(matches!(ConnInfo::parse("sslmode=always", &env).unwrap_err(), ConnInfoError::BadValue { option: "sslmode", .. }));
    assert!(matches!(ConnInfo::parse("port=http", &env).unwrap_err(), ConnInfoError::BadValue { option: "port", .. }));
    assert!(matches!(ConnInfo::parse("host='unterminated", &env).unwrap_err(), ConnInfoError::Syntax(_)));
    assert!(matches!(ConnInfo::parse("host", &env).unwrap_err(), ConnInfoError::Syntax(_)));
}

#[test]
fn errors_never_echo_a_password() {
    let env = FakeEnv::default();
    for bad in [
        "postgresql://me:hunter%zz2@db/app",
        "postgresql://me:hunter%2@db/app",
        "postgresql://me:hunter%ff2@db/app",
        "postgresql://me@db/app?password=hunter%zz2",
        "host=db password=hunter 2",
        "host=db password=hunter 2=x",
    ] {
        let e = ConnInfo::parse(bad, &env).unwrap_err().to_string();
        assert!(!e.contains("hunter") && !e.contains(" 2"), "{bad}: {e}");
    }
    let e = ConnInfo::parse("postgresql://me:hunter%zz2@db/app", &env).unwrap_err().to_string();
    assert!(e.contains("password") && e.contains("%25"), "{e}");
    let e = ConnInfo::parse("host=db password=hunter 2", &env).unwrap_err().to_string();
    assert!(e.contains("password='...'"), "{e}");
    // Other parts are still shown, and ordinary options still parse.
    assert!(ConnInfo::parse("postgresql://me@db/a%zz", &env).unwrap_err().to_string().contains("a%zz"));
    assert_eq!(ConnInfo::parse("password=x host=db", &env).unwrap().host, Host::Tcp("db".into()));
}

#[test]
fn without_secrets_keeps_everything_else() {
    let s = without_secrets("postgresql://me:p%40ss@db:6543/my%20db?sslmode=require&sslpassword=kp").unwrap();
    assert_eq!(s, "dbname='my db' host='db' port='6543' sslmode='require' user='me'");
    let s = without_secrets("host=/tmp password='a b' application_name='it\\'s' options='-c x=\\\\'").unwrap();
    assert_eq!(s, "application_name='it\\'s' host='/tmp' options='-c x=\\\\'");
    // What it gives back parses to the same settings, password aside.
    let env = FakeEnv::default();
    let mut a = ConnInfo::parse("host=/tmp password='a b' application_name='it\\'s' options='-c x=\\\\'", &env).unwrap();
    a.password = None;
    assert_eq!(ConnInfo::parse(&s, &env).unwrap(), a);
}

#[test]
fn secrets_stay_out_of_debug_and_display() {
    let c = ConnInfo::parse("password=hunter2 sslpassword=keypass", &FakeEnv::default()).unwrap();
    let shown = format!("{c:?} {c}");
    assert!(!shown.contains("hunter2") && !shown.contains("keypass"), "{shown}");
}
