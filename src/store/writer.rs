//! The writer thread: the only read-write connection, group commit, and the chain's
//! sequence and hashes (see the module above).

use super::*;

/// The writer thread: takes the first queued batch (blocking), then every batch already
/// queued behind it, and writes them all in one transaction.
pub(super) fn run_writer(mut conn: Connection, path: &Path, requests: mpsc::Receiver<Request>) {
    // The chain head, read from the database the first time and after every failed
    // transaction, kept in memory otherwise.
    let mut head: Option<Head> = None;
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (batches, replies): (Vec<WriteBatch>, Vec<_>) =
            group.into_iter().map(|r| (r.batch, r.reply)).unzip();
        let write_err = |message: String| StoreError::Write {
            path: path.to_path_buf(),
            message,
        };
        match write_group(&mut conn, &mut head, batches) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // The caller may have stopped waiting; its batch is written anyway.
                    let _ = reply.send(result.map_err(write_err));
                }
            }
            Err(message) => {
                tracing::error!(db = %path.display(), "state database transaction failed: {message}");
                for reply in replies {
                    let _ = reply.send(Err(write_err(message.clone())));
                }
            }
        }
    }
}

/// Writes `batches` in one transaction, each in its own savepoint. The outer error fails
/// all of them (nothing was stored, `head` is forgotten and reloaded next time); an inner
/// one only its batch.
fn write_group(
    conn: &mut Connection,
    head: &mut Option<Head>,
    batches: Vec<WriteBatch>,
) -> Result<Vec<Result<Vec<OperationRow>, String>>, String> {
    let cached = head.take();
    let time_ms = now_ms();
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| format!("cannot begin a transaction: {e}"))?;
    let mut current = match cached {
        Some(h) => h,
        None => load_head(&tx)?,
    };
    let start_seq = current.seq;
    let mut results = Vec::with_capacity(batches.len());
    for batch in batches {
        let sp = tx
            .savepoint()
            .map_err(|e| format!("cannot begin a savepoint: {e}"))?;
        let mut next = current.clone();
        match apply(&sp, &mut next, time_ms, batch) {
            Ok(rows) => {
                sp.commit()
                    .map_err(|e| format!("cannot release a savepoint: {e}"))?;
                current = next;
                results.push(Ok(rows));
            }
            Err(message) => {
                // Dropping the savepoint rolls it back.
                drop(sp);
                tracing::warn!("state database: one change was refused: {message}");
                results.push(Err(message));
            }
        }
    }
    if current.seq != start_seq {
        tx.prepare_cached(
            "INSERT INTO chain_head (id, seq, hash) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        )
        .and_then(|mut st| st.execute(params![sql_int(current.seq)?, current.hash]))
        .map_err(|e| format!("cannot record the chain head: {e}"))?;
    }
    tx.commit().map_err(|e| format!("cannot commit: {e}"))?;
    *head = Some(current);
    Ok(results)
}

/// The head to continue the chain from: the recorded chain head, or the last row if
/// rows were added past it (verify reports that; refusing every write would not help).
fn load_head(conn: &Connection) -> Result<Head, String> {
    let read = |sql: &str| -> Result<Option<Head>, String> {
        conn.query_row(sql, [], |r| {
            let seq: i64 = r.get(0)?;
            Ok(Head {
                seq: u64::try_from(seq).unwrap_or(0),
                hash: r.get(1)?,
            })
        })
        .optional()
        .map_err(|e| format!("cannot read the chain head: {e}"))
    };
    let anchor = read("SELECT seq, hash FROM chain_head WHERE id = 1")?;
    let last = read("SELECT seq, hash FROM operations ORDER BY seq DESC LIMIT 1")?;
    Ok(match (anchor, last) {
        (Some(a), Some(l)) if l.seq > a.seq => {
            tracing::warn!(
                "the operation log goes on to row {} past the recorded chain head (row {}); continuing after row {}",
                l.seq,
                a.seq,
                l.seq
            );
            l
        }
        (Some(a), _) => a,
        (None, Some(l)) => {
            tracing::warn!(
                "the operation log has no recorded chain head; continuing after its last row ({})",
                l.seq
            );
            l
        }
        (None, None) => Head {
            seq: 0,
            hash: GENESIS_HASH.to_string(),
        },
    })
}

/// Writes one batch: its jobs and leases (upserts) and its operations, sealed onto
/// `head`, which is advanced past them.
fn apply(
    conn: &Connection,
    head: &mut Head,
    time_ms: u64,
    batch: WriteBatch,
) -> Result<Vec<OperationRow>, String> {
    for job in &batch.jobs {
        let info = &job.info;
        let info_text = serde_json::to_string(info)
            .map_err(|e| format!("job {}: cannot encode its info: {e}", info.id))?;
        let runtime = serde_json::to_string(&job.runtime)
            .map_err(|e| format!("job {}: cannot encode its runtime: {e}", info.id))?;
        conn.prepare_cached(
            "INSERT INTO jobs (id, state, lease, durable, submitted_ms, info, runtime)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, lease = excluded.lease,
                 durable = excluded.durable, submitted_ms = excluded.submitted_ms,
                 info = excluded.info, runtime = excluded.runtime",
        )
        .and_then(|mut st| {
            st.execute(params![
                info.id,
                info.state.as_str(),
                info.lease,
                info.durable,
                sql_int(info.submitted_ms)?,
                info_text,
                runtime
            ])
        })
        .map_err(|e| format!("job {}: {e}", info.id))?;
    }
    for lease in &batch.leases {
        conn.prepare_cached(
            "INSERT INTO leases (id, owner_uid, state, ttl_ms, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET owner_uid = excluded.owner_uid,
                 state = excluded.state, ttl_ms = excluded.ttl_ms,
                 created_ms = excluded.created_ms, expires_ms = excluded.expires_ms",
        )
        .and_then(|mut st| {
            st.execute(params![
                lease.id,
                lease.owner_uid,
                lease.state.as_str(),
                sql_int(lease.ttl_ms)?,
                sql_int(lease.created_ms)?,
                sql_int(lease.expires_ms)?
            ])
        })
        .map_err(|e| format!("lease {}: {e}", lease.id))?;
    }
    for region in &batch.regions {
        let info = serde_json::to_string(region)
            .map_err(|e| format!("region {}: cannot encode it: {e}", region.name))?;
        conn.prepare_cached(
            "INSERT INTO regions (name, info) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET info = excluded.info",
        )
        .and_then(|mut st| st.execute(params![region.name, info]))
        .map_err(|e| format!("region {}: {e}", region.name))?;
    }
    for name in &batch.regions_deleted {
        conn.prepare_cached("DELETE FROM regions WHERE name = ?1")
            .and_then(|mut st| st.execute(params![name]))
            .map_err(|e| format!("region {name}: {e}"))?;
    }
    let mut rows = Vec::with_capacity(batch.ops.len());
    for op in batch.ops {
        let row = OperationRow::seal(head.seq + 1, time_ms, &head.hash, op);
        let requester = serde_json::to_string(&row.requester)
            .map_err(|e| format!("operation {}: cannot encode its requester: {e}", row.seq))?;
        let change = serde_json::to_string(&row.change)
            .map_err(|e| format!("operation {}: cannot encode its change: {e}", row.seq))?;
        conn.prepare_cached(&format!(
            "INSERT INTO operations ({OPERATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))
        .and_then(|mut st| {
            st.execute(params![
                sql_int(row.seq)?,
                sql_int(row.time_ms)?,
                requester,
                row.action,
                row.target,
                row.authority,
                change,
                row.rollback,
                row.prev_hash,
                row.hash
            ])
        })
        .map_err(|e| format!("operation {} ({}): {e}", row.seq, row.action))?;
        head.seq = row.seq;
        head.hash.clone_from(&row.hash);
        rows.push(row);
    }
    Ok(rows)
}
