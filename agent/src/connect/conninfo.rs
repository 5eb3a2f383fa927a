//! libpq connection strings: `key=value` lists and `postgresql://` URIs,
//! completed from `PG*` environment variables, libpq's defaults and the
//! password file, so decant accepts exactly what psql accepts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("invalid connection string: {0}")]
    Syntax(String),
    #[error("invalid connection string: unknown option \"{0}\"")]
    UnknownOption(String),
    #[error("invalid connection string: {option} = {value:?}: {reason}")]
    BadValue { option: &'static str, value: String, reason: &'static str },
}

/// `sslmode`, with libpq's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, ConnInfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(ConnInfoError::BadValue {
                    option: "sslmode",
                    value: s.to_owned(),
                    reason: "expected disable, allow, prefer, require, verify-ca or verify-full",
                })
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket.
    Socket(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Socket(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A complete set of connection parameters.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub sslpassword: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<u64>,
    /// Server options (`-c name=value …`), sent in the startup packet.
    pub options: Option<String>,
}

/// Passwords never reach logs: Debug and Display leave them out.
impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("sslpassword", &self.sslpassword.as_ref().map(|_| "********"))
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.options)
            .finish()
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host={} port={} user={} dbname={} sslmode={}", self.host, self.port, self.user, self.dbname, self.sslmode.name())
    }
}

/// Where defaults come from; the real process environment in production,
/// a map in tests.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn home(&self) -> Option<PathBuf>;
    fn os_user(&self) -> Option<String>;
    fn read_file(&self, path: &Path) -> Option<String>;
}

/// The process's environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn home(&self) -> Option<PathBuf> {
        std::env::var_os("HOME").map(PathBuf::from)
    }
    fn os_user(&self) -> Option<String> {
        std::env::var("USER").ok().or_else(|| std::env::var("LOGNAME").ok())
    }
    fn read_file(&self, path: &Path) -> Option<String> {
        // libpq ignores a password file that others can read; so do we.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).ok()?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
                );
                return None;
            }
        }
        std::fs::read_to_string(path).ok()
    }
}

const KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "application_name",
    "connect_timeout",
    "options",
    "passfile",
];

/// Parses a connection string (either form) into raw key/value pairs.
pub fn parse_pairs(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let s = s.trim();
    let pairs = if s.starts_with("postgresql://") || s.starts_with("postgres://") { parse_uri(s)? } else { parse_keyword_value(s)? };
    for k in pairs.keys() {
        if !KEYS.contains(&k.as_str()) {
            return Err(ConnInfoError::UnknownOption(k.clone()));
        }
    }
    Ok(pairs)
}

/// `s` (a connection string, either form) without its secrets, in
/// `key='value'` form, for a program that takes the secrets another way
/// (pg_dump: PGPASSWORD). Everything else is passed on as given, so the
/// program resolves defaults, `PG*` variables and the password file as
/// libpq does.
pub fn without_secrets(s: &str) -> Result<String, ConnInfoError> {
    let pairs = parse_pairs(s)?;
    let parts: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| !SECRET_KEYS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    Ok(parts.join(" "))
}

/// Options whose values are secrets: never echoed in an error.
const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

fn parse_keyword_value(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut pairs = BTreeMap::new();
    let mut chars = s.chars().peekable();
    // The previous option, when it was a secret given without quotes: a
    // word that follows it is most likely the rest of a value with a space,
    // and is not echoed.
    let mut after_secret: Option<String> = None;
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if let Some(secret) = after_secret.take().filter(|_| chars.peek() != Some(&'=') || !KEYS.contains(&key.as_str())) {
            return Err(ConnInfoError::Syntax(format!(
                "unexpected text after the value of \"{secret}\" (not shown); a value with spaces must be quoted: {secret}='...'"
            )));
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!("missing \"=\" after \"{key}\"")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        let quoted = chars.peek() == Some(&'\'');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError::Syntax(format!("unterminated quoted value for \"{key}\""))),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(ConnInfoError::Syntax(format!("unterminated quoted value for \"{key}\""))),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if !quoted && SECRET_KEYS.contains(&key.as_str()) {
            after_secret = Some(key.clone());
        }
        pairs.insert(key, value);
    }
}

/// Decodes one part of a URI; `part` names it in errors, which show the
/// text itself only when it is not a secret.
fn percent_decode(s: &str, part: &str) -> Result<String, ConnInfoError> {
    let shown = || if SECRET_KEYS.contains(&part) { format!("the {part} (not shown)") } else { format!("the {part} \"{s}\"") };
    let bad = || ConnInfoError::Syntax(format!("bad percent-encoding in {} of the URI; write a literal % as %25", shown()));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit())).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::Syntax(format!("the percent-encoding of {} in the URI is not UTF-8", shown())))
}

fn parse_uri(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut pairs = BTreeMap::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.insert("user".to_owned(), percent_decode(user, "user")?);
            }
            if let Some(p) = password {
                pairs.insert("password".to_owned(), percent_decode(p, "password")?);
            }
            hostport
        }
        None => authority,
    };
    if hostport.contains(',') {
        return Err(ConnInfoError::Syntax("several hosts in one connection string are not supported".into()));
    }
    if !hostport.is_empty() {
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            // [IPv6]:port
            let (h, after) = inner.split_once(']').ok_or_else(|| ConnInfoError::Syntax(format!("unterminated [ in \"{hostport}\"")))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if !host.is_empty() {
            pairs.insert("host".to_owned(), percent_decode(host, "host")?);
        }
        if let Some(p) = port.filter(|p| !p.is_empty()) {
            pairs.insert("port".to_owned(), p.to_owned());
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.insert("dbname".to_owned(), percent_decode(db, "database name")?);
    }
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').ok_or_else(|| ConnInfoError::Syntax(format!("URI parameter \"{param}\" has no value")))?;
        let k = percent_decode(k, "parameter name")?;
        let v = percent_decode(v, &k)?;
        pairs.insert(k, v);
    }
    Ok(pairs)
}

impl ConnInfo {
    /// Parses `s` and completes it as libpq would: connection string first,
    /// then `PG*` environment variables, then built-in defaults, then the
    /// password file for a missing password.
    pub fn parse(s: &str, env: &dyn Environment) -> Result<ConnInfo, ConnInfoError> {
        let pairs = parse_pairs(s)?;
        let get = |key: &str, var: &str| pairs.get(key).cloned().filter(|v| !v.is_empty()).or_else(|| env.var(var));
        let host = match get("hostaddr", "PGHOSTADDR").or_else(|| get("host", "PGHOST")) {
            Some(h) if h.starts_with('/') => Host::Socket(PathBuf::from(h)),
            Some(h) => Host::Tcp(h),
            None => {
                let default_socket = Path::new("/var/run/postgresql");
                if default_socket.exists() {
                    Host::Socket(default_socket.to_path_buf())
                } else {
                    Host::Tcp("localhost".to_owned())
                }
            }
        };
        let port = match get("port", "PGPORT") {
            Some(p) => p.parse().map_err(|_| ConnInfoError::BadValue { option: "port", value: p, reason: "expected a port number" })?,
            None => 5432,
        };
        let user = get("user", "PGUSER").or_else(|| env.os_user()).unwrap_or_else(|| "postgres".to_owned());
        let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
        let sslmode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let home_file = |name: &str| env.home().map(|h| h.join(".postgresql").join(name));
        let existing = |p: Option<PathBuf>| p.filter(|p| p.exists());
        let sslrootcert = get("sslrootcert", "PGSSLROOTCERT").map(PathBuf::from).or_else(|| existing(home_file("root.crt")));
        let sslcert = get("sslcert", "PGSSLCERT").map(PathBuf::from).or_else(|| existing(home_file("postgresql.crt")));
        let sslkey = get("sslkey", "PGSSLKEY").map(PathBuf::from).or_else(|| existing(home_file("postgresql.key")));
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            Some(t) => Some(t.parse().map_err(|_| ConnInfoError::BadValue {
                option: "connect_timeout",
                value: t,
                reason: "expected whole seconds",
            })?),
            None => None,
        }
        .filter(|&t| t > 0);
        let mut info = ConnInfo {
            host,
            port,
            user,
            password: get("password", "PGPASSWORD"),
            dbname,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            sslpassword: pairs.get("sslpassword").cloned(),
            application_name: get("application_name", "PGAPPNAME"),
            connect_timeout,
            options: get("options", "PGOPTIONS"),
        };
        if info.password.is_none() {
            let passfile = get("passfile", "PGPASSFILE").map(PathBuf::from).or_else(|| env.home().map(|h| h.join(".pgpass")));
            if let Some(contents) = passfile.and_then(|p| env.read_file(&p)) {
                info.password = pgpass_lookup(&contents, &info);
            }
        }
        Ok(info)
    }
}

/// The password for `info` from a password file (`host:port:db:user:password`,
/// `*` matching anything, `\` escaping `:` and `\`).
pub fn pgpass_lookup(contents: &str, info: &ConnInfo) -> Option<String> {
    let host = match &info.host {
        Host::Tcp(h) => h.clone(),
        // libpq matches socket connections as "localhost".
        Host::Socket(_) => "localhost".to_owned(),
    };
    let port = info.port.to_string();
    for line in contents.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        let [h, p, d, u, password] = fields.as_slice() else { continue };
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if matches(h, &host) && matches(p, &port) && matches(d, &info.dbname) && matches(u, &info.user) {
            return Some(password.clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("fields is never empty").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().expect("fields is never empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests;
