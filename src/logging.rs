//! Logs in runc's formats, so that containerd, Docker and podman can read them.
//!
//! containerd's shim passes `--log FILE --log-format json` and, when a command fails, reads the
//! last `error` object of that file to build the message Docker prints (`OCI runtime create
//! failed: ...`). It expects logrus's JSON shape: one object a line with `level`, `msg` and
//! `time`. youki's own tracing JSON uses other keys, which makes Docker print "unknown".
//! With `--log-format text` (the default) we print logrus's text shape:
//! `time="..." level=error msg="..."`.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The two log formats runc knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// Parses runc's `--log-format` value; absent means text, as in runc.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        match value {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => bail!("invalid log-format: {other}"),
        }
    }
}

/// logrus's level names (runc logs through logrus).
pub fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// One log line in runc's format, without the trailing newline.
pub fn format_line(format: LogFormat, level: &str, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            serde_json::json!({ "level": level, "msg": msg, "time": time }).to_string()
        }
        LogFormat::Text => {
            // logrus quotes the message when it holds anything but plain characters.
            let quoted = serde_json::Value::String(msg.to_string()).to_string();
            format!("time=\"{time}\" level={level} msg={quoted}")
        }
    }
}

/// The current time as runc writes it (RFC 3339 with nanoseconds, UTC).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Collects an event's fields into one message: the `message` field first, then `key=value`.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    extra: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.push_extra(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write as _;
            let _ = write!(self.message, "{value:?}");
        } else {
            self.push_extra(field, format_args!("{value:?}"));
        }
    }
}

impl MessageVisitor {
    fn push_extra(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        let _ = write!(self.extra, " {}={}", field.name(), value);
    }

    fn finish(self) -> String {
        if self.extra.is_empty() {
            self.message
        } else {
            format!("{}{}", self.message, self.extra)
        }
    }
}

/// Reports a failure that happens before the command line is parsed (sealing the binary):
/// an error line to the `--log` file named in `args`, in the `--log-format` they name, so that
/// containerd shows it instead of "unknown".
pub fn report_early_failure<I, T>(args: I, msg: &str)
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let value = |flag: &str| {
        let eq = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, a)| {
            let a = a.to_str()?;
            if a == flag {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(&eq).map(std::ffi::OsString::from)
            }
        })
    };
    let Some(log) = value("--log") else { return };
    let format = match value("--log-format").as_deref().and_then(|f| f.to_str()) {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    if let Ok(logger) = Logger::open(Some(Path::new(&log)), format) {
        logger.fatal(msg);
    }
}

/// The message of the last `error` line in `text` (runc's JSON or text format).
pub fn last_error_in(text: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
            return (v["level"] == "error")
                .then(|| v["msg"].as_str().map(str::to_string))
                .flatten();
        }
        if !l.contains(" level=error ") {
            return None;
        }
        let quoted = l.split_once(" msg=")?.1;
        serde_json::Deserializer::from_str(quoted)
            .into_iter::<String>()
            .next()?
            .ok()
    })
}

/// A `tracing` formatter that writes runc's line format.
pub struct RuncFormat(pub LogFormat);

impl<S, N> FormatEvent<S, N> for RuncFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        let line = format_line(
            self.0,
            level_name(event.metadata().level()),
            &visitor.finish(),
            &now(),
        );
        writeln!(writer, "{line}")
    }
}

/// Where log lines go: a file opened for append, or stderr.
#[derive(Clone)]
enum Sink {
    File(Arc<Mutex<std::fs::File>>),
    Stderr,
}

/// A writer handing whole lines to the sink (one `write` per line keeps lines from
/// interleaving with the container's init process, which logs to the same file).
pub struct SinkWriter(Sink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Sink::File(f) => match f.lock() {
                Ok(mut f) => f.write_all(buf).map(|_| buf.len()),
                Err(_) => Ok(buf.len()),
            },
            Sink::Stderr => std::io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logger {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter(self.sink.clone())
    }
}

/// The runtime's logger: where runc's global flags say, in runc's format.
#[derive(Clone)]
pub struct Logger {
    sink: Sink,
    format: LogFormat,
    to_file: bool,
    /// Where the log file ended when this command opened it.
    start: u64,
}

impl Logger {
    /// The last error line written to the log file since this command opened it (by this
    /// process or the container's init, which share the file).
    fn last_error_logged(&self) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Sink::File(f) = &self.sink else {
            return None;
        };
        let mut f = f.lock().ok()?;
        let len = f.metadata().ok()?.len();
        // The tail is enough: the cause is one of the last lines.
        let from = self.start.max(len.saturating_sub(64 * 1024));
        f.seek(SeekFrom::Start(from)).ok()?;
        let mut text = String::new();
        let file: &std::fs::File = &f;
        file.take(len - from).read_to_string(&mut text).ok()?;
        last_error_in(&text).filter(|m| !m.is_empty())
    }

    /// Opens the log destination (`--log`, else stderr).
    pub fn open(path: Option<&Path>, format: LogFormat) -> Result<Self> {
        let (sink, to_file, start) = match path {
            Some(p) if p != Path::new("/dev/stderr") => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .read(true)
                    .open(p)
                    .with_context(|| format!("failed to open log file {}", p.display()))?;
                let start = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Sink::File(Arc::new(Mutex::new(f))), true, start)
            }
            _ => (Sink::Stderr, false, 0),
        };
        Ok(Logger {
            sink,
            format,
            to_file,
            start,
        })
    }

    /// Installs this logger as the process's `tracing` subscriber.
    /// Without `--debug`, only our own warnings and everyone's errors are logged: libcontainer
    /// warns about every cgroup controller this host lacks, which runc never prints and which
    /// podman would show the user on every `exec`.
    pub fn install(&self, debug: bool) {
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::prelude::*;
        let filter = if debug {
            Targets::new().with_default(LevelFilter::DEBUG)
        } else {
            Targets::new()
                .with_default(LevelFilter::ERROR)
                .with_target("agentfense", LevelFilter::WARN)
        };
        let layer = tracing_subscriber::fmt::layer()
            .event_format(RuncFormat(self.format))
            .with_writer(self.clone());
        let _ = tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init();
    }

    /// Reports a command's failure as runc does: an `error` line in the log and, when the log
    /// is a file, the bare message on stderr too.
    ///
    /// containerd shows only the last error line of the log. When libcontainer logged the
    /// cause on a line of its own before failing with a general error ("io error"), the cause
    /// is added to the last line, so that Docker and Kubernetes users see it.
    pub fn fatal(&self, msg: &str) {
        let msg = match self.last_error_logged() {
            Some(cause) if !msg.contains(&cause) => format!("{msg}: {cause}"),
            _ => msg.to_string(),
        };
        let msg = msg.as_str();
        let line = format_line(self.format, "error", msg, &now());
        let _ = SinkWriter(self.sink.clone()).write(format!("{line}\n").as_bytes());
        if self.to_file {
            let _ = writeln!(std::io::stderr(), "{msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_runc_keys_only() {
        let line = format_line(LogFormat::Json, "error", "exec: \"x\": not found", "T");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 3);
        assert_eq!(obj["level"], "error");
        assert_eq!(obj["msg"], "exec: \"x\": not found");
        assert_eq!(obj["time"], "T");
    }

    #[test]
    fn text_line_is_logrus_shaped() {
        let line = format_line(LogFormat::Text, "warning", "a \"b\"", "T");
        assert_eq!(line, r#"time="T" level=warning msg="a \"b\"""#);
    }

    #[test]
    fn log_format_values() {
        assert_eq!(LogFormat::parse(None).unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::parse(Some("json")).unwrap(), LogFormat::Json);
        assert_eq!(LogFormat::parse(Some("text")).unwrap(), LogFormat::Text);
        let err = LogFormat::parse(Some("xml")).unwrap_err().to_string();
        assert_eq!(err, "invalid log-format: xml");
    }

    #[test]
    fn time_is_rfc3339_utc() {
        let t = now();
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok(), "{t}");
        assert!(t.ends_with('Z'));
    }

    #[test]
    fn fatal_carries_the_cause_logged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        std::fs::write(
            &path,
            format_line(LogFormat::Json, "error", "old failure", "T") + "\n",
        )
        .unwrap();
        let logger = Logger::open(Some(&path), LogFormat::Json).unwrap();
        // Nothing logged by this command yet: the old run's line is not a cause.
        logger.fatal("first");
        // The container's init logs the cause, then the runtime fails with a general error.
        let cause = "failed to write to /proc/self/oom_score_adj: Permission denied";
        let mut w = SinkWriter(logger.sink.clone());
        w.write_all((format_line(LogFormat::Json, "error", cause, "T") + "\n").as_bytes())
            .unwrap();
        logger.fatal("failed to create container: io error");
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            last["msg"],
            format!("failed to create container: io error: {cause}")
        );
        let lines: Vec<&str> = text.lines().collect();
        let first: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(first["msg"], "first");
        // Text format too.
        let t = format_line(LogFormat::Text, "error", "a \"quoted\" cause", "T");
        assert_eq!(last_error_in(&t).as_deref(), Some("a \"quoted\" cause"));
        assert_eq!(last_error_in("level=info"), None);
    }

    #[test]
    fn early_failures_reach_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let p = path.to_str().unwrap();
        report_early_failure(
            [
                "agentfense-runc",
                "--root",
                "/r",
                "--log",
                p,
                "--log-format=json",
                "create",
                "x",
            ],
            "failed to seal /proc/self/exe: boom",
        );
        let v: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "failed to seal /proc/self/exe: boom");
        // No --log: nothing to write, nothing fails.
        report_early_failure(["agentfense-runc", "create", "x"], "m");
    }

    #[test]
    fn fatal_writes_one_json_error_line_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let logger = Logger::open(Some(&path), LogFormat::Json).unwrap();
        logger.fatal("container \"x\" does not exist");
        logger.fatal("second");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
    }
}
