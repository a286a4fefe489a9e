//! Errors of the policy engine. Every message says what is wrong and where (rule index,
//! field, annotation key), so that a refused container can be fixed from the message alone.

use std::fmt;

/// A policy that cannot be used. Never "fail open": whoever gets this must refuse to run
/// the container (or report the error, for the CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A self-contained message, e.g. `unknown preset "x"; expected one of ...`.
    Invalid(String),
    /// A problem with one rule: `rule {index}: {message}`. `index` is the position in the
    /// rule list the user wrote (0-based).
    Rule {
        /// Position of the rule in the list it was given in (0-based).
        index: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Several independent problems (all reported at once, so one run of `policy check`
    /// shows them all).
    Multiple(Vec<PolicyError>),
    /// A problem found while reading `context` (an annotation key, an environment variable,
    /// a configuration field): `{context}: {inner}`.
    Context {
        /// Where: e.g. `agentfense.io/policy`, `floor`.
        context: String,
        /// What.
        inner: Box<PolicyError>,
    },
}

impl PolicyError {
    /// A plain message.
    pub fn invalid(msg: impl Into<String>) -> PolicyError {
        PolicyError::Invalid(msg.into())
    }

    /// A problem with rule `index`.
    pub fn rule(index: usize, msg: impl Into<String>) -> PolicyError {
        PolicyError::Rule {
            index,
            message: msg.into(),
        }
    }

    /// This error, prefixed with where it was found.
    pub fn context(self, context: impl Into<String>) -> PolicyError {
        PolicyError::Context {
            context: context.into(),
            inner: Box::new(self),
        }
    }

    /// One error if `errors` holds one, [`PolicyError::Multiple`] otherwise.
    pub(crate) fn from_many(mut errors: Vec<PolicyError>) -> PolicyError {
        if errors.len() == 1 {
            if let Some(e) = errors.pop() {
                return e;
            }
        }
        PolicyError::Multiple(errors)
    }

    /// Every individual problem as one line each, with its context prefixed
    /// (`agentfense.io/policy: rule 3: unknown permission "rw"; ...`).
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect("", &mut out);
        out
    }

    fn collect(&self, prefix: &str, out: &mut Vec<String>) {
        match self {
            PolicyError::Invalid(m) => out.push(format!("{prefix}{m}")),
            PolicyError::Rule { index, message } => {
                out.push(format!("{prefix}rule {index}: {message}"))
            }
            PolicyError::Multiple(v) => {
                for e in v {
                    e.collect(prefix, out);
                }
            }
            PolicyError::Context { context, inner } => {
                inner.collect(&format!("{prefix}{context}: "), out);
            }
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.messages().join("; "))
    }
}

impl std::error::Error for PolicyError {}

/// A string quoted for a message, with control characters escaped and long values cut, so
/// that no input can forge extra lines in an error or a log.
pub(crate) fn quote(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::with_capacity(s.len().min(MAX) + 2);
    out.push('"');
    for (n, c) in s.chars().enumerate() {
        if n >= MAX {
            out.push_str("...");
            break;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_flatten_with_context() {
        let e = PolicyError::Multiple(vec![
            PolicyError::rule(3, "bad"),
            PolicyError::invalid("worse"),
        ])
        .context("agentfense.io/policy");
        assert_eq!(
            e.messages(),
            vec![
                "agentfense.io/policy: rule 3: bad",
                "agentfense.io/policy: worse"
            ]
        );
        assert_eq!(
            e.to_string(),
            "agentfense.io/policy: rule 3: bad; agentfense.io/policy: worse"
        );
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a\"b\n\u{0}"), "\"a\\\"b\\n\\u{0}\"");
        assert!(quote(&"x".repeat(1000)).ends_with("...\""));
    }
}
