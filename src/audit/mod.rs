//! The operation log: one row per thing agentd was asked to do or did on its own, each
//! sealed into a hash chain so that an edited, removed, reordered or appended row shows.
//!
//! This module knows nothing about storage: it builds and checks rows. `store` keeps them
//! in SQLite, together with the chain head (the anchor `verify` compares the last row
//! with), written in the same transaction as every append.
//!
//! The hash of a row is `sha256(prev_hash || "\n" || canonical JSON of (seq, time_ms,
//! requester, action, target, authority, change, rollback))`, as lowercase hex. The JSON is
//! canonical because its shape is fixed here (a struct, fields in declaration order) and
//! the keys of every object inside `change` are written sorted, so the same row always
//! hashes to the same bytes, whatever order its JSON was stored or parsed in.
//!
//! A chain protects against partial tampering: someone who edits one row must re-seal
//! every later row and the recorded head to hide it. It does not protect against someone
//! who rewrites the whole database; for that, copy `head_hash` elsewhere now and then.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev_hash` of row 1: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who asked: the peer's credentials (SO_PEERCRED), and the agent identity where a job asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl Requester {
    /// agentd itself, for what it does on its own (a job exits, a lease expires, recovery
    /// after a restart).
    pub fn daemon() -> Requester {
        Requester {
            uid: 0,
            gid: 0,
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            agent: Some("agentd".to_string()),
        }
    }
}

/// An operation about to be recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewOperation {
    pub requester: Requester,
    /// What was requested: "job.submit", "job.start", "job.exit", "job.kill",
    /// "job.freeze", "lease.take", "api.deny", ...
    pub action: String,
    /// The object acted on (job id, lease id), if any.
    pub target: Option<String>,
    /// The rule or grant that allowed it, or why it was denied ("policy default:
    /// lifecycle.durable = true", "socket group agentd", "denied: uid 1000 is neither
    /// root nor in group agentd").
    pub authority: String,
    /// What changed: ids, before/after state (free JSON object).
    pub change: Value,
    /// How to undo it, or why it cannot be undone.
    pub rollback: String,
}

/// One recorded row. `hash` = hex sha256 over `prev_hash` and the canonical JSON of
/// (seq, time_ms, requester, action, target, authority, change, rollback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationRow {
    pub seq: u64,
    pub time_ms: u64,
    pub requester: Requester,
    pub action: String,
    pub target: Option<String>,
    pub authority: String,
    pub change: Value,
    pub rollback: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hashed content of a row, in the fixed order that makes its JSON canonical.
/// Changing this struct (fields, names, order) invalidates every recorded chain.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time_ms: u64,
    requester: &'a Requester,
    action: &'a str,
    target: Option<&'a str>,
    authority: &'a str,
    change: Canonical<'a>,
    rollback: &'a str,
}

impl Hashed<'_> {
    fn hash(&self, prev_hash: &str) -> String {
        // Serializing plain structs, strings and JSON values into memory cannot fail.
        let json = serde_json::to_vec(self).expect("operation rows serialize to JSON");
        let mut h = Sha256::new();
        h.update(prev_hash.as_bytes());
        h.update(b"\n");
        h.update(&json);
        crate::spec::hex(&h.finalize())
    }
}

/// Writes a JSON value with the keys of every object sorted, whichever map type
/// serde_json was built with (with its `preserve_order` feature, parsed objects keep
/// their text's order; sorting here keeps the hash independent of that).
struct Canonical<'a>(&'a Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Canonical(item))?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let mut out = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    out.serialize_entry(k, &Canonical(v))?;
                }
                out.end()
            }
            other => other.serialize(s),
        }
    }
}

/// The hash of the row that `op` becomes at `seq`, recorded at `time_ms`, after the row
/// whose hash is `prev_hash` (GENESIS_HASH for row 1).
pub fn row_hash(prev_hash: &str, seq: u64, time_ms: u64, op: &NewOperation) -> String {
    Hashed {
        seq,
        time_ms,
        requester: &op.requester,
        action: &op.action,
        target: op.target.as_deref(),
        authority: &op.authority,
        change: Canonical(&op.change),
        rollback: &op.rollback,
    }
    .hash(prev_hash)
}

impl OperationRow {
    /// Makes `op` row `seq` of the chain, after the row whose hash is `prev_hash`.
    ///
    /// Floating-point numbers in `change` are first settled to the value they read back
    /// as from JSON: serde_json's default float parsing is best-effort, and a number that
    /// came back one bit different from the store would look like an edit.
    pub fn seal(seq: u64, time_ms: u64, prev_hash: &str, mut op: NewOperation) -> OperationRow {
        op.change = settle_floats(op.change);
        let hash = row_hash(prev_hash, seq, time_ms, &op);
        OperationRow {
            seq,
            time_ms,
            requester: op.requester,
            action: op.action,
            target: op.target,
            authority: op.authority,
            change: op.change,
            rollback: op.rollback,
            prev_hash: prev_hash.to_string(),
            hash,
        }
    }

    /// The hash this row's content and `prev_hash` give; equal to `hash` unless the row
    /// was changed after it was sealed.
    pub fn expected_hash(&self) -> String {
        Hashed {
            seq: self.seq,
            time_ms: self.time_ms,
            requester: &self.requester,
            action: &self.action,
            target: self.target.as_deref(),
            authority: &self.authority,
            change: Canonical(&self.change),
            rollback: &self.rollback,
        }
        .hash(&self.prev_hash)
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// Round-trips `v` through JSON text until it reads back as itself (at once for anything
/// without floats; in practice at most once more for floats).
fn settle_floats(mut v: Value) -> Value {
    if !has_float(&v) {
        return v;
    }
    for _ in 0..4 {
        let text = Canonical(&v);
        let Ok(back) = serde_json::to_string(&text)
            .map_err(|_| ())
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|_| ()))
        else {
            return v;
        };
        if back == v {
            return v;
        }
        v = back;
    }
    v
}

/// Result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    /// Rows walked (all of them, also past a problem).
    pub rows: u64,
    /// The last row's seq and hash (0 and GENESIS_HASH when there are none).
    pub head_seq: u64,
    pub head_hash: String,
    /// The first row found wrong (its seq), and what is wrong in one sentence a sysadmin
    /// understands.
    pub bad_seq: Option<u64>,
    pub problem: Option<String>,
}

impl VerifyReport {
    /// Marks the report failed at `seq` with `problem`, unless an earlier problem is
    /// already recorded (the first one found is the one to look at).
    pub fn fail(&mut self, seq: u64, problem: String) {
        if self.problem.is_none() {
            self.ok = false;
            self.bad_seq = Some(seq);
            self.problem = Some(problem);
        }
    }
}

fn missing(first: u64, last: u64) -> String {
    if first == last {
        format!("row {first} is missing")
    } else {
        format!("rows {first} to {last} are missing")
    }
}

/// Walks rows in seq order and reports the first thing wrong.
///
/// `anchor` is the (seq, hash) the store recorded as the chain head in the same
/// transaction as the last append. Without it, removing the newest rows leaves a shorter
/// chain that is still perfectly linked; with it, a removed (or rewritten, or appended)
/// tail shows. `None` means no anchor is known, and the tail is not checked.
///
/// Detected, each named by the first row it affects: a chain that does not start at row
/// 1 from GENESIS_HASH; a row whose content no longer matches its hash (edited); missing
/// rows (a seq gap); rows out of order; a row whose `prev_hash` is not the previous row's
/// hash (replaced or moved); a tail that disagrees with the anchor.
pub fn verify(
    rows: impl IntoIterator<Item = OperationRow>,
    anchor: Option<(u64, String)>,
) -> VerifyReport {
    let mut report = VerifyReport {
        ok: true,
        rows: 0,
        head_seq: 0,
        head_hash: GENESIS_HASH.to_string(),
        bad_seq: None,
        problem: None,
    };
    // The last row walked (seq, hash); None before the first.
    let mut prev: Option<(u64, String)> = None;
    let mut rows = rows.into_iter().peekable();
    while let Some(row) = rows.next() {
        report.rows += 1;
        if report.problem.is_none() {
            check_row(&mut report, prev.as_ref(), &row, rows.peek());
        }
        prev = Some((row.seq, row.hash));
    }
    if let Some((seq, hash)) = &prev {
        report.head_seq = *seq;
        report.head_hash.clone_from(hash);
    }
    if let Some((anchor_seq, anchor_hash)) = anchor {
        check_anchor(&mut report, anchor_seq, &anchor_hash);
    }
    report
}

fn check_row(
    report: &mut VerifyReport,
    prev: Option<&(u64, String)>,
    row: &OperationRow,
    next: Option<&OperationRow>,
) {
    let prev_seq = prev.map_or(0, |p| p.0);
    let expected_seq = prev_seq + 1;
    if row.seq != expected_seq {
        if row.seq > expected_seq && next.is_some_and(|n| n.seq == expected_seq) {
            report.fail(
                expected_seq,
                format!(
                    "rows {expected_seq} and {} are out of order: row {} comes before row {expected_seq}",
                    row.seq, row.seq
                ),
            );
        } else if row.seq > expected_seq {
            let problem = if prev.is_none() {
                format!(
                    "{}: the log starts at row {}",
                    missing(expected_seq, row.seq - 1),
                    row.seq
                )
            } else {
                format!(
                    "{}: row {} follows row {prev_seq}",
                    missing(expected_seq, row.seq - 1),
                    row.seq
                )
            };
            report.fail(expected_seq, problem);
        } else {
            report.fail(
                row.seq,
                format!(
                    "row {} is out of order: it comes after row {prev_seq}",
                    row.seq
                ),
            );
        }
        return;
    }
    if row.expected_hash() != row.hash {
        report.fail(
            row.seq,
            format!(
                "row {} was edited: its content no longer matches its hash",
                row.seq
            ),
        );
        return;
    }
    match prev {
        None if row.prev_hash != GENESIS_HASH => report.fail(
            row.seq,
            format!(
                "row {} does not start the chain: its prev_hash is not the genesis hash, so rows before it were removed or it was copied from another log",
                row.seq
            ),
        ),
        Some((p, prev_hash)) if row.prev_hash != *prev_hash => report.fail(
            row.seq,
            format!(
                "row {} does not follow row {p} in the chain: its prev_hash is not row {p}'s hash, so row {p} was replaced or row {} was moved here",
                row.seq, row.seq
            ),
        ),
        _ => {}
    }
}

fn check_anchor(report: &mut VerifyReport, anchor_seq: u64, anchor_hash: &str) {
    let last = report.head_seq;
    if last < anchor_seq {
        report.fail(
            last + 1,
            format!(
                "{}: the recorded chain head is row {anchor_seq}, but the last row is {}",
                missing(last + 1, anchor_seq),
                if last == 0 {
                    "none (the log is empty)".to_string()
                } else {
                    format!("row {last}")
                }
            ),
        );
    } else if last > anchor_seq {
        report.fail(
            anchor_seq + 1,
            format!(
                "row {} was added behind agentd's back: the recorded chain head is row {anchor_seq}, but the log goes on to row {last}",
                anchor_seq + 1
            ),
        );
    } else if report.head_hash != anchor_hash {
        report.fail(
            last,
            format!(
                "row {last} is not the row recorded as the chain head: its hash differs, so the chain was rewritten"
            ),
        );
    }
}

#[cfg(test)]
mod tests;
