//! Unit tests of the store: group commit, reopening, tamper detection.
use super::*;
use crate::api::types::JobState;
use crate::audit::Requester;
use serde_json::json;
use std::sync::Arc;

fn job(id: &str, state: JobState, submitted_ms: u64) -> JobRecord {
    JobRecord {
        info: JobInfo {
            id: id.into(),
            state,
            command: vec!["/bin/true".into(), "--flag".into()],
            policy: "default".into(),
            policy_hash: "ab".repeat(32),
            agent: "claude".into(),
            model: "opus".into(),
            workspace: Some("/srv/work".into()),
            lease: Some("lease-1".into()),
            durable: false,
            requester: Requester {
                uid: 1000,
                gid: 1000,
                pid: 77,
                agent: Some("claude".into()),
            },
            submitted_ms,
            started_ms: None,
            ended_ms: None,
            pid: None,
            cgroup: vec![],
            exit: None,
            reason: None,
            usage: None,
            report: None,
            review: None,
            snapshot: None,
            tool_calls: Vec::new(),
            waiting: false,
            regions: Vec::new(),
        },
        runtime: json!({"cgroup_dir": "/sys/fs/cgroup/agentd/j1", "pidfd": null}),
    }
}

fn lease(id: &str) -> LeaseInfo {
    LeaseInfo {
        id: id.into(),
        owner_uid: 1000,
        state: LeaseState::Active,
        ttl_ms: 30_000,
        created_ms: 1_000,
        expires_ms: 31_000,
        jobs: vec!["ignored".into()],
    }
}

fn op(action: &str, target: &str) -> NewOperation {
    NewOperation {
        requester: Requester {
            uid: 1000,
            gid: 1000,
            pid: 77,
            agent: None,
        },
        action: action.into(),
        target: Some(target.into()),
        authority: "socket group agentd".into(),
        change: json!({"job": target, "to": "submitted", "n": 1.5}),
        rollback: format!("agentctl kill {target}"),
    }
}

fn ops_batch(n: usize, tag: &str) -> WriteBatch {
    WriteBatch {
        ops: (0..n)
            .map(|i| op("job.submit", &format!("{tag}-{i}")))
            .collect(),
        ..Default::default()
    }
}

fn raw(dir: &Path) -> Connection {
    Connection::open(dir.join(DB_FILE)).unwrap()
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<Arc<Store>>();
}

#[test]
fn terminal_states_match_job_state() {
    let terminal: Vec<String> = JobState::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("'{s}'"))
        .collect();
    assert_eq!(TERMINAL_STATES_SQL, format!("({})", terminal.join(", ")));
}

#[test]
fn open_creates_private_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/agentd");
    let store = Store::open(&dir).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
    assert_eq!(store.path(), dir.join(DB_FILE));
    drop(store);
    // An existing file that is too open is tightened.
    std::fs::set_permissions(dir.join(DB_FILE), Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&dir).unwrap();
    assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
    let conn = raw(&dir);
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let jm: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(jm, "wal");
}

#[test]
fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Store::open(tmp.path()).unwrap());
    raw(tmp.path())
        .pragma_update(None, "user_version", 3)
        .unwrap();
    let err = Store::open(tmp.path()).err().unwrap();
    assert!(matches!(err, StoreError::Schema { found: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("agentd.db") && msg.contains("version 3"),
        "{msg}"
    );
}

#[test]
fn a_version_1_store_gains_the_regions_table_and_keeps_its_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    store
        .commit_blocking(WriteBatch::job(
            job("j1", JobState::Running, 1_000),
            op("job.submit", "j1"),
        ))
        .unwrap();
    drop(store);
    // Back to what an agentd before regions wrote.
    let conn = raw(tmp.path());
    conn.execute_batch("DROP TABLE regions").unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    let store = Store::open(tmp.path()).unwrap();
    assert!(store.job("j1").unwrap().is_some());
    assert!(store.regions().unwrap().is_empty());
    assert!(store.verify().unwrap().ok);
}

#[test]
fn commit_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.job("j1").unwrap(), None);
    let j1 = job("j1", JobState::Running, 2_000);
    let rows = store
        .commit_blocking(WriteBatch {
            jobs: vec![j1.clone(), job("j0", JobState::Exited, 1_000)],
            leases: vec![lease("lease-1")],
            ops: vec![op("lease.take", "lease-1"), op("job.submit", "j1")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].seq, rows[1].seq), (1, 2));
    assert_eq!(rows[0].prev_hash, GENESIS_HASH);
    assert_eq!(rows[1].prev_hash, rows[0].hash);
    assert_eq!(rows[0].action, "lease.take");

    assert_eq!(store.job("j1").unwrap(), Some(j1.clone()));
    let all = store.jobs().unwrap();
    assert_eq!(
        all.iter().map(|j| j.info.id.as_str()).collect::<Vec<_>>(),
        ["j0", "j1"]
    );
    let open = store.unfinished_jobs().unwrap();
    assert_eq!(open, vec![j1.clone()]);
    let leases = store.leases().unwrap();
    assert_eq!(
        leases,
        vec![LeaseInfo {
            jobs: vec![],
            ..lease("lease-1")
        }]
    );
    assert_eq!(store.operations(0, None).unwrap(), rows);
    assert_eq!(store.operations(1, None).unwrap(), rows[1..]);
    assert_eq!(store.operations(0, Some(1)).unwrap(), rows[..1]);
    assert_eq!(store.operation_count().unwrap(), 2);

    // Upsert: the job moves on, the lease expires.
    let mut j1_done = j1;
    j1_done.info.state = JobState::Exited;
    j1_done.info.ended_ms = Some(9_000);
    let mut l = lease("lease-1");
    l.state = LeaseState::Expired;
    store
        .commit_blocking(WriteBatch {
            jobs: vec![j1_done.clone()],
            leases: vec![l],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(store.job("j1").unwrap(), Some(j1_done));
    assert!(store.unfinished_jobs().unwrap().is_empty());
    assert_eq!(store.leases().unwrap()[0].state, LeaseState::Expired);
    assert_eq!(store.jobs().unwrap().len(), 2);
    let report = store.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!((report.rows, report.head_seq), (2, 2));
}

#[test]
fn empty_store_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let r = store.verify().unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows, 0);
    assert!(
        store
            .commit_blocking(WriteBatch::default())
            .unwrap()
            .is_empty()
    );
    assert!(store.verify().unwrap().ok);
}

/// 8 threads × 50 batches × 2 ops, then reopen and go on.
#[test]
fn concurrent_commits_chain_then_reopen_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path()).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for b in 0..50 {
                    let rows = store
                        .commit_blocking(ops_batch(2, &format!("t{t}b{b}")))
                        .unwrap();
                    assert_eq!(rows.len(), 2);
                    // A batch's rows are consecutive.
                    assert_eq!(rows[1].seq, rows[0].seq + 1);
                    assert_eq!(rows[1].prev_hash, rows[0].hash);
                    seqs.extend(rows.iter().map(|r| r.seq));
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=800).collect::<Vec<u64>>());
    assert_eq!(store.operation_count().unwrap(), 800);
    let stored: Vec<u64> = store
        .operations(0, None)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(stored, (1..=800).collect::<Vec<u64>>());
    let r = store.verify().unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.rows, r.head_seq), (800, 800));
    let head = r.head_hash;

    drop(Arc::into_inner(store).unwrap());
    let store = Store::open(tmp.path()).unwrap();
    let rows = store.commit_blocking(ops_batch(1, "after")).unwrap();
    assert_eq!(rows[0].seq, 801);
    assert_eq!(rows[0].prev_hash, head);
    let r = store.verify().unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows, 801);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_commits_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path()).unwrap());
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut n = 0;
                for b in 0..5 {
                    n += store
                        .commit(ops_batch(1, &format!("t{t}b{b}")))
                        .await
                        .unwrap()
                        .len();
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 320);
    let r = store.verify().unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.head_seq, 320);
}

#[test]
fn queued_work_is_finished_on_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let pending: Vec<_> = (0..20)
        .map(|i| store.submit(ops_batch(1, &format!("q{i}"))).unwrap())
        .collect();
    drop(store);
    for p in pending {
        assert_eq!(p.blocking_recv().unwrap().unwrap().len(), 1);
    }
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.operation_count().unwrap(), 20);
}

fn store_with_rows(n: usize) -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    for i in 0..n {
        store
            .commit_blocking(ops_batch(1, &format!("r{i}")))
            .unwrap();
    }
    (tmp, store)
}

#[test]
fn edited_row_is_named() {
    let (tmp, store) = store_with_rows(10);
    raw(tmp.path())
        .execute("UPDATE operations SET authority = 'x' WHERE seq = 5", [])
        .unwrap();
    let r = store.verify().unwrap();
    assert!(!r.ok);
    assert_eq!(r.bad_seq, Some(5));
    assert_eq!(
        r.problem.as_deref(),
        Some("row 5 was edited: its content no longer matches its hash")
    );
    assert_eq!(r.rows, 10);
}

#[test]
fn removed_tail_is_named() {
    let (tmp, store) = store_with_rows(10);
    raw(tmp.path())
        .execute("DELETE FROM operations WHERE seq = 10", [])
        .unwrap();
    let r = store.verify().unwrap();
    assert!(!r.ok);
    assert_eq!(r.bad_seq, Some(10));
    assert!(
        r.problem
            .as_deref()
            .unwrap()
            .contains("the recorded chain head is row 10, but the last row is row 9"),
        "{r:?}"
    );
    // The writer keeps the gap visible instead of reusing seq 10.
    let rows = store.commit_blocking(ops_batch(1, "next")).unwrap();
    assert_eq!(rows[0].seq, 11);
    assert_eq!(store.verify().unwrap().bad_seq, Some(10));
}

#[test]
fn removed_middle_row_is_named() {
    let (tmp, store) = store_with_rows(10);
    raw(tmp.path())
        .execute("DELETE FROM operations WHERE seq = 4", [])
        .unwrap();
    let r = store.verify().unwrap();
    assert_eq!(r.bad_seq, Some(4));
    assert_eq!(
        r.problem.as_deref(),
        Some("row 4 is missing: row 5 follows row 3")
    );
}

#[test]
fn damaged_row_is_named() {
    let (tmp, store) = store_with_rows(10);
    raw(tmp.path())
        .execute(
            "UPDATE operations SET change = '{not json' WHERE seq = 6",
            [],
        )
        .unwrap();
    let r = store.verify().unwrap();
    assert_eq!(r.bad_seq, Some(6));
    assert!(r.problem.unwrap().starts_with("row 6 is damaged"));
    assert_eq!(r.rows, 10);
    let err = store.operations(0, None).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn missing_chain_head_is_reported() {
    let (tmp, store) = store_with_rows(3);
    raw(tmp.path())
        .execute("DELETE FROM chain_head", [])
        .unwrap();
    let r = store.verify().unwrap();
    assert!(!r.ok);
    assert!(r.problem.unwrap().contains("chain head is missing"));
}

#[test]
fn failed_batch_leaves_its_group_and_the_chain_intact() {
    let (tmp, store) = store_with_rows(2);
    // A trigger that refuses one particular job stands in for a write that fails.
    raw(tmp.path())
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON jobs WHEN NEW.id = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
        )
        .unwrap();
    let bad = WriteBatch {
        jobs: vec![job("bad", JobState::Submitted, 1)],
        ops: vec![op("job.submit", "bad")],
        ..Default::default()
    };
    let err = store.commit_blocking(bad).unwrap_err();
    assert!(err.to_string().contains("refused by test"), "{err}");
    assert!(store.job("bad").unwrap().is_none());
    let rows = store.commit_blocking(ops_batch(1, "good")).unwrap();
    assert_eq!(rows[0].seq, 3);
    assert!(store.verify().unwrap().ok);
}
