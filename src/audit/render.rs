//! Rendering records and summaries for people.

use std::fmt::Write as _;

use serde_json::Value;

use super::{AuditDecision, Op, Record, Summary};

/// The first 12 characters of a container id (as `docker ps` shows them).
fn short_id(id: &str) -> &str {
    match id.char_indices().nth(12) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// A record time for people: RFC 3339 UTC to the second (`2026-02-03T10:23:45Z`); an
/// unparseable time is shown as it is.
pub fn format_ts(ts: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(ts) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        Err(_) => ts.to_string(),
    }
}

/// One record as a line for people, without newline:
/// `[2026-02-03T10:23:45Z] abc123def456: Read allowed: /src/main.py`.
pub fn format_record(r: &Record) -> String {
    let msg = if r.is_access() {
        access_message(r)
    } else {
        lifecycle_message(r)
    };
    format!("[{}] {}: {msg}", format_ts(&r.ts), short_id(&r.container))
}

fn access_message(r: &Record) -> String {
    let path = r.path.as_deref().unwrap_or("?");
    let (Some(op), Some(decision)) = (r.op, r.decision) else {
        return format!("Access: {path}");
    };
    if decision == AuditDecision::Hidden {
        return format!("Path hidden: {path}");
    }
    let verb = match op {
        Op::Open if r.mode.as_deref() == Some("write") => "Write",
        Op::Open => "Read",
        Op::Opendir => "List",
        Op::Create | Op::Mknod => "Create",
        Op::Mkdir => "Create directory",
        Op::Symlink => "Symlink",
        Op::Link => "Link",
        Op::Unlink => "Delete",
        Op::Rmdir => "Delete directory",
        Op::Rename => "Rename",
        Op::Setattr => "Change attributes",
        Op::Setxattr => "Set xattr",
        Op::Removexattr => "Remove xattr",
        Op::Lookup => "Lookup",
        Op::Readlink => "Read link",
        Op::Getxattr => "Read xattr",
        Op::Listxattr => "List xattrs",
        Op::Access => "Access check",
    };
    let outcome = if decision == AuditDecision::Allow {
        "allowed"
    } else {
        "denied"
    };
    let mut s = format!("{verb} {outcome}: {path}");
    if matches!(op, Op::Rename | Op::Link | Op::Symlink) {
        if let Some(to) = &r.to {
            let _ = write!(s, " -> {to}");
        }
    }
    let br = r.bytes_read.unwrap_or(0);
    let bw = r.bytes_written.unwrap_or(0);
    match (br, bw) {
        (0, 0) => {}
        (n, 0) => {
            let _ = write!(s, " ({n} bytes read)");
        }
        (0, n) => {
            let _ = write!(s, " ({n} bytes written)");
        }
        (a, b) => {
            let _ = write!(s, " ({a} bytes read, {b} written)");
        }
    }
    s
}

fn info_u64(info: &Value, key: &str) -> Option<u64> {
    info.get(key).and_then(Value::as_u64)
}

fn lifecycle_message(r: &Record) -> String {
    let info = &r.info;
    match r.event.as_str() {
        "create" => {
            let mut parts = Vec::new();
            if let Some(h) = info.get("policy_sha256").and_then(Value::as_str) {
                let short: String = h.chars().take(8).collect();
                parts.push(format!("policy sha256 {short}…"));
            }
            if let Some(d) = info.get("delta").and_then(Value::as_str) {
                parts.push(format!("delta {d}"));
            }
            if let Some(a) = info.get("audit").and_then(Value::as_str) {
                parts.push(format!("audit {a}"));
            }
            if let Some(ws) = info.get("workspaces").and_then(Value::as_array) {
                let ws: Vec<&str> = ws.iter().filter_map(Value::as_str).collect();
                if !ws.is_empty() {
                    parts.push(format!("workspaces {}", ws.join(", ")));
                }
            }
            if parts.is_empty() {
                "Container created".into()
            } else {
                format!("Container created ({})", parts.join(", "))
            }
        }
        "start" => "Container started".into(),
        "delete" => {
            let mut parts = Vec::new();
            match info.get("exit_status") {
                Some(Value::Number(n)) => parts.push(format!("exit status {n}")),
                Some(Value::Null) | None => {}
                Some(other) => parts.push(format!("exit status {other}")),
            }
            if let Some(t) = info.get("totals") {
                parts.push(format!(
                    "{} allowed, {} denied, {} hidden",
                    info_u64(t, "allow").unwrap_or(0),
                    info_u64(t, "deny").unwrap_or(0),
                    info_u64(t, "hidden").unwrap_or(0)
                ));
            }
            if let Some(d) = info_u64(info, "dropped") {
                parts.push(format!("{d} records lost"));
            }
            if parts.is_empty() {
                "Container deleted".into()
            } else {
                format!("Container deleted ({})", parts.join("; "))
            }
        }
        "daemon-stop" => format!(
            "Fence daemon stopped ({} records lost)",
            info_u64(info, "dropped").unwrap_or(0)
        ),
        "commit" => {
            let conflicts = match info.get("conflicts") {
                Some(Value::Array(a)) => Some(a.len() as u64),
                Some(v) => v.as_u64(),
                None => None,
            };
            match conflicts {
                Some(n) => format!("Delta committed ({n} conflicts)"),
                None => "Delta committed".into(),
            }
        }
        other => match info {
            Value::Null => format!("Event {other}"),
            Value::Object(m) if m.is_empty() => format!("Event {other}"),
            _ => format!("Event {other}: {info}"),
        },
    }
}

fn section(out: &mut String, title: &str, items: &[String]) {
    let _ = writeln!(out, "{title} ({}):", items.len());
    if items.is_empty() {
        out.push_str("  (none)\n");
    }
    for i in items {
        let _ = writeln!(out, "  {i}");
    }
}

/// A summary for people: one section per kind of access, then the grants never used.
pub fn render_summary_text(s: &Summary) -> String {
    let mut out = String::new();
    let _ = write!(out, "Container {}", short_id(&s.container));
    if let Some(h) = &s.policy_sha256 {
        let short: String = h.chars().take(8).collect();
        let _ = write!(out, " (policy sha256 {short}…)");
    }
    let t = &s.totals;
    let _ = writeln!(
        out,
        ": {} records; {} allowed, {} denied, {} hidden; {} records lost",
        s.records, t.allow, t.deny, t.hidden, t.dropped
    );
    section(&mut out, &format!("Read, {} bytes", s.bytes_read), &s.read);
    section(
        &mut out,
        &format!("Written, {} bytes", s.bytes_written),
        &s.written,
    );
    section(&mut out, "Created", &s.created);
    section(&mut out, "Deleted", &s.deleted);
    let renamed: Vec<String> = s
        .renamed
        .iter()
        .map(|r| format!("{} -> {}", r.from, r.to))
        .collect();
    section(&mut out, "Renamed", &renamed);
    section(&mut out, "Listed", &s.listed);
    let refused: Vec<String> = s
        .refused
        .iter()
        .map(|r| format!("{} ({})", r.path, r.ops.join(", ")))
        .collect();
    section(&mut out, "Refused", &refused);
    section(&mut out, "Probed hidden paths", &s.probed);
    if s.policy_sha256.is_none() {
        out.push_str("Granted but never touched: unknown (no policy recorded)\n");
    } else {
        let grants: Vec<String> = s
            .untouched
            .iter()
            .map(|g| format!("{} ({}, rule {})", g.pattern, g.permission, g.rule))
            .collect();
        section(&mut out, "Granted but never touched", &grants);
    }
    out
}

/// A summary as one JSON object (pretty-printed, with a final newline).
pub fn render_summary_json(s: &Summary) -> String {
    let mut j = serde_json::to_string_pretty(s).unwrap_or_else(|_| "{}".into());
    j.push('\n');
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_and_times() {
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(
            format_ts("2026-02-03T10:23:45.123Z"),
            "2026-02-03T10:23:45Z"
        );
        assert_eq!(format_ts("garbage"), "garbage");
    }
}
