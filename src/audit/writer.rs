//! [`AuditLog`]: the fence daemon's audit writer. FUSE threads hand records over a bounded
//! queue to one writer thread, which batches them and appends each batch with one write.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::file::{append_batch, open_log, Pending};
use super::AccessRecord;
use crate::config::AuditOverflow;
use crate::policy::AuditLevel;

/// The default capacity of the queue between the FUSE threads and the writer.
pub const DEFAULT_QUEUE: usize = 65536;
/// The most records appended in one write.
const BATCH: usize = 1024;
/// How long the writer waits for more records before writing a batch.
const LINGER: Duration = Duration::from_millis(50);

type Msg = Box<(SystemTime, AccessRecord)>;

/// The audit log of one fence daemon. Share it behind an [`Arc`] (it is `Send + Sync`;
/// [`AuditLog::access`] takes `&self`). Dropping it (or [`AuditLog::close`]) writes every
/// queued record, then a `daemon-stop` record with the count of records that could not be
/// written, and waits for the writer thread.
///
/// At level [`AuditLevel::Off`] there is no file and no thread: every call is a no-op.
pub struct AuditLog {
    level: AuditLevel,
    overflow: AuditOverflow,
    tx: Option<Sender<Msg>>,
    /// Records queued and not yet taken by the writer, at most `capacity`. (A counter over an
    /// unbounded channel rather than a bounded channel: that one allocates and touches all
    /// its slots up front, a MiB per idle daemon.)
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("level", &self.level)
            .field("overflow", &self.overflow)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl AuditLog {
    /// Opens (creating, mode 0600, never through a symlink) the audit file at `path` for
    /// container `container` and starts the writer thread, with a queue of
    /// [`DEFAULT_QUEUE`] records. At level `off`, opens nothing.
    pub fn open(
        path: &Path,
        container: &str,
        level: AuditLevel,
        overflow: AuditOverflow,
    ) -> io::Result<AuditLog> {
        AuditLog::open_with_capacity(path, container, level, overflow, DEFAULT_QUEUE)
    }

    /// [`AuditLog::open`] with a queue of `capacity` records (at least 1).
    pub fn open_with_capacity(
        path: &Path,
        container: &str,
        level: AuditLevel,
        overflow: AuditOverflow,
        capacity: usize,
    ) -> io::Result<AuditLog> {
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let capacity = capacity.max(1);
        if level == AuditLevel::Off {
            return Ok(AuditLog {
                level,
                overflow,
                tx: None,
                queued,
                capacity,
                dropped,
                thread: None,
            });
        }
        let file = open_log(path)?;
        let (tx, rx) = channel();
        let container = container.to_string();
        let d = Arc::clone(&dropped);
        let q = Arc::clone(&queued);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(file, container, rx, q, d))?;
        Ok(AuditLog {
            level,
            overflow,
            tx: Some(tx),
            queued,
            capacity,
            dropped,
            thread: Some(thread),
        })
    }

    /// The level this log records at.
    pub fn level(&self) -> AuditLevel {
        self.level
    }

    /// Whether `rec` would be kept at this log's level (to skip building records that would
    /// be filtered out anyway, see [`AccessRecord::kept_at`]).
    pub fn keeps(&self, rec: &AccessRecord) -> bool {
        self.tx.is_some() && rec.kept_at(self.level)
    }

    /// Records one access, if the level keeps it. Never blocks with
    /// [`AuditOverflow::Count`]: when the queue is full the record is counted as dropped.
    /// With [`AuditOverflow::Block`], waits for room in the queue.
    pub fn access(&self, rec: AccessRecord) {
        let Some(tx) = &self.tx else { return };
        if !rec.kept_at(self.level) {
            return;
        }
        let msg = Box::new((SystemTime::now(), rec));
        // Take a place in the queue: when it is full, count the record as dropped, or wait
        // for the writer to make room.
        while self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let writer_gone = self.thread.as_ref().is_none_or(|t| t.is_finished());
            if self.overflow == AuditOverflow::Count || writer_gone {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if tx.send(msg).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records lost so far: refused by a full queue, or whose write failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes everything queued and the `daemon-stop` record, and stops the writer thread
    /// (the same as dropping the log).
    pub fn close(self) {
        drop(self)
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: batch, append, and at the end the `daemon-stop` record.
fn writer(
    file: File,
    container: String,
    rx: Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
) {
    let mut cache = None;
    let mut batch: Vec<Pending> = Vec::new();
    let push = |batch: &mut Vec<Pending>, m: Msg| {
        queued.fetch_sub(1, Ordering::AcqRel);
        let (t, r) = *m;
        batch.push(Pending::Access(t, r));
    };
    let mut closed = false;
    while !closed {
        match rx.recv() {
            Ok(m) => push(&mut batch, m),
            Err(_) => break,
        }
        let deadline = Instant::now() + LINGER;
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => push(&mut batch, m),
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match rx.recv_timeout(deadline - now) {
                        Ok(m) => push(&mut batch, m),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
        }
        if let Err(e) = append_batch(&file, &container, &batch, &mut cache, false) {
            dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::warn!("audit: failed to write {} records: {e}", batch.len());
        }
        batch.clear();
    }
    let stop = Pending::Lifecycle(
        SystemTime::now(),
        "daemon-stop".into(),
        json!({"dropped": dropped.load(Ordering::Relaxed)}),
    );
    if let Err(e) = append_batch(&file, &container, &[stop], &mut cache, true) {
        tracing::warn!("audit: failed to write the daemon-stop record: {e}");
    }
}
