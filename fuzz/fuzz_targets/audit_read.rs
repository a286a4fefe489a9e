//! Arbitrary bytes as an audit file (SPEC §6): reading, verifying, summarising and rendering
//! never panic, and they agree with one another. The same bytes are also tried with their hash
//! chain repaired (every JSON object line given the right `seq`, `prev`, delete `head` and
//! policy digest), so that verification gets past the chain to the checks behind it; and a
//! file that verifies must stop verifying when a byte before its last line is changed or a
//! line before its last is removed.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agentfense::audit::{
    format_record, read_log, render_summary_json, render_summary_text, summary, summary_from_log,
    totals, verify, verify_with, VerifyOptions, GENESIS,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A path of this process's own for the file `name` (libFuzzer's `-fork`/`-jobs` run several
/// processes), in memory when /dev/shm is there: every input is written to a file, and
/// removed once checked.
fn path_for(name: &str) -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    base.join(format!(
        "agentfense-fuzz-audit-{}-{name}",
        std::process::id()
    ))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The lines of `data` as `read_log` sees them: split at `\n`, the last one possibly torn.
fn lines(data: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

/// `data` with a valid hash chain over its JSON object lines.
fn rechain(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 256);
    let mut prev = GENESIS.to_string();
    for (i, line) in lines(data).into_iter().enumerate() {
        let text = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(mut m)) => {
                m.insert("seq".into(), Value::from(i as u64));
                m.insert("prev".into(), Value::from(prev.clone()));
                let event = m
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let info = m.entry("info").or_insert(Value::Null);
                if info.is_null() {
                    *info = Value::Object(Map::new());
                }
                if let Value::Object(info) = info {
                    if event == "delete" {
                        info.insert("head".into(), Value::from(prev.clone()));
                    }
                    if event == "create" {
                        if let Some(Value::String(p)) = info.get("policy") {
                            let digest = sha256_hex(p.as_bytes());
                            info.insert("policy_sha256".into(), Value::from(digest));
                        }
                    }
                }
                serde_json::to_vec(&Value::Object(m)).expect("a Value serialises")
            }
            _ => line.to_vec(),
        };
        prev = sha256_hex(&text);
        out.extend_from_slice(&text);
        out.push(b'\n');
    }
    out
}

/// Writes `data` to `name`, checks everything on it, removes it.
fn check(name: &str, data: &[u8], seed: u64) {
    let path = path_for(name);
    fs::write(&path, data).expect("cannot write the fuzz input");
    check_file(&path, data, seed);
    let _ = fs::remove_file(&path);
}

fn check_file(path: &Path, data: &[u8], seed: u64) {
    let all = lines(data);
    let n_lines = all.len() as u64;

    // Reading: every line is either a record or a bad line, in order.
    let log = read_log(path).expect("read_log failed on a readable file");
    assert_eq!(
        log.records.len() + log.bad_lines.len(),
        all.len(),
        "records + bad lines != lines"
    );
    let mut last = 0;
    for r in &log.records {
        assert!(
            r.line > last && r.line <= n_lines,
            "record line {} out of order",
            r.line
        );
        assert!(!log.bad_lines.contains(&r.line));
        assert_eq!(r.raw.as_bytes(), all[(r.line - 1) as usize]);
        last = r.line;
        let _ = format_record(r);
    }

    // Verifying: agrees with reading, and the stricter checks only refuse more.
    let verified = verify(path).map_err(|e| e.to_string());
    match &verified {
        Ok(n) => {
            assert_eq!(*n, n_lines, "verify counted {n} of {n_lines} lines");
            assert!(
                log.bad_lines.is_empty(),
                "verified with bad lines {:?}",
                log.bad_lines
            );
            if let Some(first) = log.records.first() {
                assert_eq!(data.last(), Some(&b'\n'));
                let opts = VerifyOptions {
                    container: Some(&first.container),
                    deleted: false,
                };
                assert_eq!(
                    verify_with(path, &opts).map_err(|e| e.to_string()),
                    verified
                );
            }
        }
        Err(_) => {
            let opts = VerifyOptions {
                container: None,
                deleted: true,
            };
            assert!(
                verify_with(path, &opts).is_err(),
                "deleted=true accepted what verify refused"
            );
        }
    }
    if let Err(e) = verify(path) {
        assert!(
            e.line >= 1 && e.line <= n_lines + 1,
            "error at line {}",
            e.line
        );
    }

    // Summaries: never panic, count what they were given, and render.
    let s = summary(&log.records, &[]);
    assert_eq!(s.records, log.records.len() as u64);
    let accesses = log.records.iter().filter(|r| r.is_access()).count() as u64;
    assert!(s.totals.allow + s.totals.deny + s.totals.hidden <= accesses);
    let _ = render_summary_text(&s);
    serde_json::from_str::<Value>(&render_summary_json(&s)).expect("summary JSON does not parse");
    if let Ok(s2) = summary_from_log(&log.records) {
        assert_eq!(
            s2.totals,
            totals(path).expect("totals failed on a readable file")
        );
        let _ = render_summary_text(&s2);
        serde_json::from_str::<Value>(&render_summary_json(&s2))
            .expect("summary JSON does not parse");
    }

    // Tampering with a verified file before its last line is always detected.
    if let Ok(n) = verified {
        if n >= 2 {
            let last_start = data[..data.len() - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let mut edited = data.to_vec();
            let at = (seed % last_start as u64) as usize;
            edited[at] ^= 1 + ((seed >> 32) as u8 % 255);
            let p = path.with_extension("edited");
            fs::write(&p, &edited).expect("cannot write the fuzz input");
            let r = verify(&p);
            let _ = fs::remove_file(&p);
            assert!(r.is_err(), "byte {at} changed and the file still verifies");

            let cut = (seed % (n - 1)) as usize;
            let mut removed = Vec::with_capacity(data.len());
            for (i, l) in all.iter().enumerate() {
                if i != cut {
                    removed.extend_from_slice(l);
                    removed.push(b'\n');
                }
            }
            let p = path.with_extension("removed");
            fs::write(&p, &removed).expect("cannot write the fuzz input");
            let r = verify(&p);
            let _ = fs::remove_file(&p);
            assert!(
                r.is_err(),
                "line {} removed and the file still verifies",
                cut + 1
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let seed = u64::from_le_bytes(Sha256::digest(data)[..8].try_into().unwrap());
    check("raw.jsonl", data, seed);
    let chained = rechain(data);
    if chained != data {
        check("chained.jsonl", &chained, seed);
    }
});
