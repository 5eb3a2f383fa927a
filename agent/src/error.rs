//! Turning an error and its causes into one line for the operator.

use std::error::Error;

/// The error followed by each cause that adds something: libraries often
/// repeat their cause in their own message, so a cause already contained in
/// the text so far is left out.
pub fn report(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {source}")]
    struct Outer {
        source: Inner,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner {
        source: std::io::Error,
    }

    #[test]
    fn causes_appear_once() {
        let e = Outer { source: Inner { source: std::io::Error::other("disk on fire") } };
        assert_eq!(report(&e), "outer: inner: disk on fire");
    }
}
