//! Durable state in SQLite: jobs, leases and the operation log, at
//! `<state_dir>/agentd.db`.
//!
//! Writes go through one dedicated writer thread that owns the only read-write
//! connection, and practise group commit: every batch submitted while the writer is busy
//! with a transaction goes into the next one, with one fsync for all of them. With
//! `synchronous = FULL` an fsync costs milliseconds, so one transaction per change would
//! cap agentd at a few hundred changes a second on a good disk and far fewer on a poor
//! one; grouped, hundreds of jobs a second still fit, and each caller still only hears
//! back once its change is on disk.
//!
//! The single writer is also what keeps the operation log a chain: it alone assigns
//! `seq` (last + 1, never duplicated or skipped) and `prev_hash`, and it writes the chain
//! head (`chain_head`: the last seq and hash) in the same transaction as the rows. The
//! head is the anchor `verify` checks the last row against, so deleting the newest rows,
//! which would leave a shorter chain that is still perfectly linked, shows too.
//!
//! Reads use a separate read-only connection; in WAL mode they never wait for the writer
//! and always see the last committed transaction.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::api::types::{JobInfo, LeaseInfo, LeaseState};
use crate::audit::{self, GENESIS_HASH, NewOperation, OperationRow, VerifyReport};

mod writer;
use writer::run_writer;
#[cfg(test)]
mod tests;

/// The file inside the state directory.
pub const DB_FILE: &str = "agentd.db";

/// The schema this agentd writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// How long a statement waits for a lock held by another connection (an administrator's
/// `sqlite3` shell, say) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most batches one transaction takes, so that the first caller of a long queue does
/// not wait for all of it.
const MAX_GROUP: usize = 512;

/// Job states after which nothing more happens (`JobState::is_terminal`), for SQL.
const TERMINAL_STATES_SQL: &str = "('exited', 'killed', 'failed', 'lost')";

const SCHEMA_V1: &str = r#"
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY NOT NULL,
    state        TEXT NOT NULL,
    lease        TEXT,
    durable      INTEGER NOT NULL,
    submitted_ms INTEGER NOT NULL,
    info         TEXT NOT NULL,   -- JSON of api::types::JobInfo
    runtime      TEXT NOT NULL    -- JSON, the daemon's own
);
CREATE INDEX jobs_by_submitted ON jobs (submitted_ms, id);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE TABLE leases (
    id         TEXT PRIMARY KEY NOT NULL,
    owner_uid  INTEGER NOT NULL,
    state      TEXT NOT NULL,
    ttl_ms     INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE operations (
    seq        INTEGER PRIMARY KEY,
    time_ms    INTEGER NOT NULL,
    requester  TEXT NOT NULL,     -- JSON of audit::Requester
    "action"   TEXT NOT NULL,
    target     TEXT,
    authority  TEXT NOT NULL,
    change     TEXT NOT NULL,     -- JSON
    "rollback" TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TABLE chain_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"#;

/// Version 2: regions (userfaultfd-served byte ranges, `region::RegionInfo` as JSON).
const SCHEMA_V2: &str = r#"
CREATE TABLE regions (
    name TEXT PRIMARY KEY NOT NULL,
    info TEXT NOT NULL   -- JSON of region::RegionInfo
);
"#;

const OPERATION_COLUMNS: &str =
    r#"seq, time_ms, requester, "action", target, authority, change, "rollback", prev_hash, hash"#;

/// A job as stored: what the API shows, and what the daemon needs to pick it up again
/// after a restart (opaque here).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub info: JobInfo,
    pub runtime: Value,
}

/// Everything one logical change writes, applied atomically (one transaction): the job
/// and lease rows it changes (upserts) and the operations that record it.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub jobs: Vec<JobRecord>,
    /// The `jobs` field of a lease is not stored (it is derived from the jobs).
    pub leases: Vec<LeaseInfo>,
    /// Regions to insert or replace.
    pub regions: Vec<crate::region::RegionInfo>,
    /// Regions whose records go (`region delete`).
    pub regions_deleted: Vec<String>,
    pub ops: Vec<NewOperation>,
}

impl WriteBatch {
    /// One job's change and the operation that records it.
    pub fn job(record: JobRecord, op: NewOperation) -> WriteBatch {
        WriteBatch {
            jobs: vec![record],
            ops: vec![op],
            ..Default::default()
        }
    }

    /// One lease's change and the operation that records it.
    pub fn lease(lease: LeaseInfo, op: NewOperation) -> WriteBatch {
        WriteBatch {
            leases: vec![lease],
            ops: vec![op],
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the state database {}: {source}", .path.display())]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the state database {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "cannot use the state database {}: SQLite refused write-ahead logging (journal mode stays {mode:?}); is the file on a network file system?",
        .path.display()
    )]
    NoWal { path: PathBuf, mode: String },
    #[error("cannot start the writer thread for the state database {}: {source}", .path.display())]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state database {} has schema version {found}, but this agentd knows only version {SCHEMA_VERSION}; run the agentd that wrote it, or move the file aside to start afresh",
        .path.display()
    )]
    Schema { path: PathBuf, found: i64 },
    #[error("cannot read the state database {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A write failed; nothing of the batch was stored.
    #[error("cannot write to the state database {}: {message}; nothing of this change was stored", .path.display())]
    Write { path: PathBuf, message: String },
    #[error("the state database {} is damaged: {what}", .path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("cannot write to the state database {}: its writer thread has stopped (see the log above); restart agentd", .path.display())]
    Closed { path: PathBuf },
}

/// A batch on its way to the writer, with where to send its result.
struct Request {
    batch: WriteBatch,
    reply: oneshot::Sender<Result<Vec<OperationRow>, StoreError>>,
}

struct Writer {
    queue: mpsc::Sender<Request>,
    thread: JoinHandle<()>,
}

/// The state database. Send + Sync: share it as `Arc<Store>`.
pub struct Store {
    path: PathBuf,
    /// None only while dropping.
    writer: Option<Writer>,
    reader: Mutex<Connection>,
}

/// The last row of the chain as the writer knows it.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    hash: String,
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/agentd.db`, creating `state_dir` with mode
    /// 0700 if it is missing; the database file gets mode 0600 (it holds every job's
    /// command line and environment). Migrates the schema, then starts the writer thread.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StoreError::CreateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let path = state_dir.join(DB_FILE);
        create_private_file(&path)?;

        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.clone(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;

        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;

        let (queue, requests) = mpsc::channel();
        let writer_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("agentd-store".into())
            .spawn(move || run_writer(conn, &writer_path, requests))
            .map_err(|source| StoreError::Thread {
                path: path.clone(),
                source,
            })?;
        Ok(Store {
            path,
            writer: Some(Writer { queue, thread }),
            reader: Mutex::new(reader),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `batch` atomically and returns its operations as sealed rows (seq, time,
    /// hashes), in order, once they are on disk.
    ///
    /// Group commit: batches submitted while the writer is busy share its next
    /// transaction and fsync. A failing batch does not take the others of its group with
    /// it (each runs in its own savepoint), unless the transaction itself fails.
    ///
    /// Dropping the returned future does not withdraw the batch: once submitted, it is
    /// written.
    pub async fn commit(&self, batch: WriteBatch) -> Result<Vec<OperationRow>, StoreError> {
        let reply = self.submit(batch)?;
        reply.await.map_err(|_| self.closed())?
    }

    /// `commit` for threads outside the async runtime. Panics if called from within an
    /// async context (tokio forbids blocking there); use `commit` there.
    pub fn commit_blocking(&self, batch: WriteBatch) -> Result<Vec<OperationRow>, StoreError> {
        let reply = self.submit(batch)?;
        reply.blocking_recv().map_err(|_| self.closed())?
    }

    fn submit(
        &self,
        batch: WriteBatch,
    ) -> Result<oneshot::Receiver<Result<Vec<OperationRow>, StoreError>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or_else(|| self.closed())?;
        writer
            .queue
            .send(Request { batch, reply })
            .map_err(|_| self.closed())?;
        Ok(answer)
    }

    fn closed(&self) -> StoreError {
        StoreError::Closed {
            path: self.path.clone(),
        }
    }

    fn read_err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection itself usable.
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One job, if it exists.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let conn = self.reader();
        let texts: Option<(String, String)> = conn
            .prepare_cached("SELECT info, runtime FROM jobs WHERE id = ?1")
            .and_then(|mut st| {
                st.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.read_err())?;
        texts
            .map(|(info, runtime)| self.job_record(id, &info, &runtime))
            .transpose()
    }

    /// All jobs, oldest first (by submitted_ms, then id).
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.query_jobs("SELECT id, info, runtime FROM jobs ORDER BY submitted_ms, id")
    }

    /// The jobs that have not ended (state not exited, killed, failed or lost), oldest
    /// first: what the daemon must adopt or declare lost after a restart.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.query_jobs(&format!(
            "SELECT id, info, runtime FROM jobs WHERE state NOT IN {TERMINAL_STATES_SQL} ORDER BY submitted_ms, id"
        ))
    }

    fn query_jobs(&self, sql: &str) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.reader();
        let texts: Vec<(String, String, String)> = conn
            .prepare_cached(sql)
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(self.read_err())?;
        drop(conn);
        texts
            .iter()
            .map(|(id, info, runtime)| self.job_record(id, info, runtime))
            .collect()
    }

    fn job_record(&self, id: &str, info: &str, runtime: &str) -> Result<JobRecord, StoreError> {
        let info = serde_json::from_str(info)
            .map_err(|e| self.corrupt(format!("job {id}: its info is not valid: {e}")))?;
        let runtime = serde_json::from_str(runtime)
            .map_err(|e| self.corrupt(format!("job {id}: its runtime is not valid JSON: {e}")))?;
        Ok(JobRecord { info, runtime })
    }

    /// Every region, by name.
    pub fn regions(&self) -> Result<Vec<crate::region::RegionInfo>, StoreError> {
        let conn = self.reader();
        let rows: Vec<(String, String)> = conn
            .prepare_cached("SELECT name, info FROM regions ORDER BY name")
            .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(self.read_err())?;
        drop(conn);
        rows.into_iter()
            .map(|(name, info)| {
                serde_json::from_str(&info)
                    .map_err(|e| self.corrupt(format!("region {name}: its info is not valid: {e}")))
            })
            .collect()
    }

    /// All leases, oldest first; their `jobs` field is empty (fill it from the jobs).
    pub fn leases(&self) -> Result<Vec<LeaseInfo>, StoreError> {
        let conn = self.reader();
        let rows: Vec<(String, i64, String, i64, i64, i64)> = conn
            .prepare_cached(
                "SELECT id, owner_uid, state, ttl_ms, created_ms, expires_ms FROM leases ORDER BY created_ms, id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect()
            })
            .map_err(self.read_err())?;
        drop(conn);
        rows.into_iter()
            .map(|(id, owner_uid, state, ttl_ms, created_ms, expires_ms)| {
                let bad = |what: &str| self.corrupt(format!("lease {id}: {what}"));
                Ok(LeaseInfo {
                    owner_uid: u32::try_from(owner_uid)
                        .map_err(|_| bad(&format!("owner uid {owner_uid} is not a uid")))?,
                    state: parse_lease_state(&state)
                        .ok_or_else(|| bad(&format!("state {state:?} is not a lease state")))?,
                    ttl_ms: u64::try_from(ttl_ms).map_err(|_| bad("its ttl is negative"))?,
                    created_ms: u64::try_from(created_ms)
                        .map_err(|_| bad("its creation time is negative"))?,
                    expires_ms: u64::try_from(expires_ms)
                        .map_err(|_| bad("its expiry time is negative"))?,
                    jobs: Vec::new(),
                    id,
                })
            })
            .collect()
    }

    /// Operation rows with seq > `after_seq`, in seq order, at most `limit` of them.
    pub fn operations(
        &self,
        after_seq: u64,
        limit: Option<usize>,
    ) -> Result<Vec<OperationRow>, StoreError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let conn = self.reader();
        let rows: Vec<Result<OperationRow, Damage>> = conn
            .prepare_cached(&format!(
                "SELECT {OPERATION_COLUMNS} FROM operations WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))
            .and_then(|mut st| st.query_map(params![after, limit], read_op)?.collect())
            .map_err(self.read_err())?;
        drop(conn);
        rows.into_iter()
            .map(|r| r.map_err(|d| self.corrupt(d.sentence())))
            .collect()
    }

    /// How many operation rows there are.
    pub fn operation_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .reader()
            .query_row("SELECT count(*) FROM operations", [], |r| r.get(0))
            .map_err(self.read_err())?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Walks the whole operation log against the recorded chain head (one consistent
    /// snapshot; rows are streamed, not loaded all at once). Tampering is reported in the
    /// `VerifyReport`, not as an error; errors are only for a database that cannot be
    /// read at all.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut conn = self.reader();
        // A read transaction: the rows and the head come from the same snapshot, even
        // while the writer goes on appending.
        let tx = conn.transaction().map_err(self.read_err())?;
        let anchor: Option<(i64, String)> = tx
            .query_row("SELECT seq, hash FROM chain_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(self.read_err())?;
        let anchor = match anchor {
            None => None,
            Some((seq, hash)) => Some((
                u64::try_from(seq).map_err(|_| {
                    self.corrupt(format!("the recorded chain head names row {seq}"))
                })?,
                hash,
            )),
        };

        let mut st = tx
            .prepare(&format!(
                "SELECT {OPERATION_COLUMNS} FROM operations ORDER BY seq"
            ))
            .map_err(self.read_err())?;
        let mut rows = st.query([]).map_err(self.read_err())?;
        let mut sql_error = None;
        let mut damaged: Option<Damage> = None;
        let mut damaged_rows = 0u64;
        let walk = std::iter::from_fn(|| {
            loop {
                match rows.next() {
                    Ok(Some(row)) => match read_op(row).unwrap_or_else(|e| Err(e.into())) {
                        Ok(op) => return Some(op),
                        // Leave the damaged row out (verify sees a gap there) and say
                        // what is wrong with it below.
                        Err(d) => {
                            damaged_rows += 1;
                            damaged.get_or_insert(d);
                        }
                    },
                    Ok(None) => return None,
                    Err(e) => {
                        sql_error = Some(e);
                        return None;
                    }
                }
            }
        });
        let mut report = audit::verify(walk, anchor.clone());
        if let Some(e) = sql_error {
            return Err(self.read_err()(e));
        }
        report.rows += damaged_rows;
        if let Some(d) = damaged {
            let earlier_problem = match (d.seq, report.bad_seq) {
                (Some(d), Some(bad)) => bad < d,
                _ => false,
            };
            if !earlier_problem {
                report.ok = false;
                report.bad_seq = d.seq;
                report.problem = Some(d.sentence());
            }
        }
        if anchor.is_none() && report.rows > 0 && report.ok {
            report.ok = false;
            report.bad_seq = None;
            report.problem = Some(
                "the recorded chain head is missing, so rows removed from the end of the log cannot be ruled out".into(),
            );
        }
        Ok(report)
    }
}

impl Drop for Store {
    /// Lets the writer finish what is queued, then waits for it.
    fn drop(&mut self) {
        if let Some(Writer { queue, thread }) = self.writer.take() {
            drop(queue);
            if thread.join().is_err() {
                tracing::error!(db = %self.path.display(), "the state database writer thread panicked");
            }
        }
    }
}

fn parse_lease_state(s: &str) -> Option<LeaseState> {
    [
        LeaseState::Active,
        LeaseState::Released,
        LeaseState::Expired,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
}

/// Creates `path` with mode 0600 if missing, and takes group and other access away from
/// an existing one, before SQLite opens it (SQLite gives its -wal and -shm files the
/// database file's mode).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::CreateFile {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let mode = file.metadata().map_err(err)?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(Permissions::from_mode(mode & 0o700))
            .map_err(err)?;
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    match version {
        SCHEMA_VERSION => Ok(()),
        0 | 1 => {
            // user_version lives in the database header, so it commits with the tables.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(open_err)?;
            if version == 0 {
                tx.execute_batch(SCHEMA_V1).map_err(open_err)?;
            }
            tx.execute_batch(SCHEMA_V2).map_err(open_err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(open_err)?;
            tx.commit().map_err(open_err)
        }
        found => Err(StoreError::Schema {
            path: path.to_path_buf(),
            found,
        }),
    }
}

/// An operation row that cannot be read back as one (a column of the wrong type or
/// JSON that does not parse): tampering or corruption.
#[derive(Debug)]
struct Damage {
    seq: Option<u64>,
    what: String,
}

impl Damage {
    fn sentence(&self) -> String {
        match self.seq {
            Some(seq) => format!("row {seq} is damaged: {}", self.what),
            None => format!("a row of the operation log is damaged: {}", self.what),
        }
    }
}

impl From<rusqlite::Error> for Damage {
    fn from(e: rusqlite::Error) -> Damage {
        Damage {
            seq: None,
            what: e.to_string(),
        }
    }
}

/// Reads one operation row. The outer error is for rusqlite's sake (`query_map`); every
/// failure is returned as the inner `Damage`.
fn read_op(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<OperationRow, Damage>> {
    let seq = match r.get::<_, i64>(0).map(u64::try_from) {
        Ok(Ok(seq)) => seq,
        Ok(Err(_)) => {
            return Ok(Err(Damage {
                seq: None,
                what: "its seq is negative".into(),
            }));
        }
        Err(e) => return Ok(Err(e.into())),
    };
    let damage = |what: String| Damage {
        seq: Some(seq),
        what,
    };
    let col = |i: usize, name: &str| -> Result<String, Damage> {
        r.get::<_, String>(i)
            .map_err(|e| damage(format!("its {name} cannot be read: {e}")))
    };
    let read = || -> Result<OperationRow, Damage> {
        let time_ms: i64 = r
            .get(1)
            .map_err(|e| damage(format!("its time cannot be read: {e}")))?;
        let requester = serde_json::from_str(&col(2, "requester")?)
            .map_err(|e| damage(format!("its requester is not valid: {e}")))?;
        let target: Option<String> = r
            .get(4)
            .map_err(|e| damage(format!("its target cannot be read: {e}")))?;
        let change = serde_json::from_str(&col(6, "change")?)
            .map_err(|e| damage(format!("its change is not valid JSON: {e}")))?;
        Ok(OperationRow {
            seq,
            time_ms: u64::try_from(time_ms).map_err(|_| damage("its time is negative".into()))?,
            requester,
            action: col(3, "action")?,
            target,
            authority: col(5, "authority")?,
            change,
            rollback: col(7, "rollback")?,
            prev_hash: col(8, "prev_hash")?,
            hash: col(9, "hash")?,
        })
    };
    Ok(read())
}

/// A u64 as SQLite's signed 64-bit integer (every time, id and count agentd stores fits).
fn sql_int(v: u64) -> rusqlite::Result<i64> {
    i64::try_from(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
