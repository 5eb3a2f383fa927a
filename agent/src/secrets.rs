//! Recognising secrets in text that is about to be shown: an error
//! message may quote a configuration line or a connection string, and a
//! password must never reach a log or a terminal through it.

/// `text` with whatever looks like a connection string's secret masked: the
/// value after `password=` or `sslpassword=`, and the password of a URI's
/// `user:password@`. For messages that may quote a configuration line
/// (a TOML error shows the line it stopped at).
pub fn redact(text: &str) -> String {
    const MASK: &str = "********";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let uri = rest.find("://");
        let key = rest.find("password");
        let at = match (uri, key) {
            (None, None) => break,
            (Some(u), Some(k)) => u.min(k),
            (Some(a), None) | (None, Some(a)) => a,
        };
        if Some(at) == uri {
            // scheme://user:password@host: mask from the first ':' of the
            // user info to its '@' (the last one before a space or quote).
            let start = at + 3;
            let tail = &rest[start..];
            let end = tail.find(|c: char| c.is_whitespace() || c == '"' || c == '\'').unwrap_or(tail.len());
            let authority = &tail[..end];
            match (authority.rfind('@'), authority.find(':')) {
                (Some(a), Some(c)) if c < a => {
                    out.push_str(&rest[..start + c + 1]);
                    out.push_str(MASK);
                    rest = &rest[start + a..];
                }
                _ => {
                    out.push_str(&rest[..start]);
                    rest = &rest[start..];
                }
            }
            continue;
        }
        // password = value, password='quoted value'
        let after_key = at + "password".len();
        out.push_str(&rest[..after_key]);
        let tail = &rest[after_key..];
        let trimmed = tail.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            rest = tail;
            continue;
        };
        let value = value.trim_start();
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(&tail[..tail.len() - value.len()]);
        out.push_str(MASK);
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        for (text, shown) in [
            ("dsn = \"host=a password=hunter2 user=b\"", "dsn = \"host=a password=******** user=b\""),
            ("password = 'hun ter\\' 2' x", "password = ******** x"),
            ("sslpassword=hunter2", "sslpassword=********"),
            ("dsn = \"postgresql://me:hunter2@db/x?password=hunter2\"", "dsn = \"postgresql://me:********@db/x?password=********"),
            ("url postgres://db:5432/x and password", "url postgres://db:5432/x and password"),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
    }
}
