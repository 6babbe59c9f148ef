//! Unit tests of the hash chain: every kind of tampering is found and named.
use super::*;
use serde_json::json;

fn op(i: u64) -> NewOperation {
    NewOperation {
        requester: Requester {
            uid: 1000,
            gid: 1000,
            pid: 4242,
            agent: if i.is_multiple_of(2) {
                Some("claude".into())
            } else {
                None
            },
        },
        action: "job.submit".into(),
        target: if i.is_multiple_of(3) {
            None
        } else {
            Some(format!("job-{i}"))
        },
        authority: "socket group agentd".into(),
        change: json!({"zeta": i, "alpha": {"y": [1, 2, {"b": 1, "a": 2}], "x": null}, "state": "submitted"}),
        rollback: format!("agentctl kill job-{i}"),
    }
}

fn chain(n: u64) -> Vec<OperationRow> {
    let mut rows: Vec<OperationRow> = Vec::new();
    for seq in 1..=n {
        let prev = rows
            .last()
            .map_or(GENESIS_HASH, |r| r.hash.as_str())
            .to_string();
        rows.push(OperationRow::seal(
            seq,
            1_700_000_000_000 + seq,
            &prev,
            op(seq),
        ));
    }
    rows
}

fn anchor(rows: &[OperationRow]) -> Option<(u64, String)> {
    rows.last().map(|r| (r.seq, r.hash.clone()))
}

#[test]
fn genesis_is_64_zeros() {
    assert_eq!(GENESIS_HASH.len(), 64);
    assert!(GENESIS_HASH.bytes().all(|b| b == b'0'));
}

#[test]
fn valid_chain_verifies() {
    let rows = chain(10);
    let a = anchor(&rows);
    let head = rows[9].hash.clone();
    let r = verify(rows, a);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.rows, 10);
    assert_eq!(r.head_seq, 10);
    assert_eq!(r.head_hash, head);
    assert_eq!(r.bad_seq, None);
    assert_eq!(r.problem, None);
}

#[test]
fn empty_chain_verifies() {
    let r = verify(Vec::new(), None);
    assert!(r.ok);
    assert_eq!((r.rows, r.head_seq), (0, 0));
    assert_eq!(r.head_hash, GENESIS_HASH);
    let r = verify(Vec::new(), Some((0, GENESIS_HASH.to_string())));
    assert!(r.ok, "{r:?}");
}

#[test]
fn seal_matches_row_hash_and_expected_hash() {
    let o = op(3);
    let row = OperationRow::seal(3, 99, GENESIS_HASH, o.clone());
    assert_eq!(row.hash, row_hash(GENESIS_HASH, 3, 99, &o));
    assert_eq!(row.hash, row.expected_hash());
    assert_eq!(row.hash.len(), 64);
    // Every hashed field counts.
    let mut other = row.clone();
    other.time_ms += 1;
    assert_ne!(other.expected_hash(), row.hash);
    let mut other = row.clone();
    other.prev_hash = "1".repeat(64);
    assert_ne!(other.expected_hash(), row.hash);
    let mut other = row.clone();
    other.requester.agent = Some("x".into());
    assert_ne!(other.expected_hash(), row.hash);
    let mut other = row.clone();
    other.target = Some(String::new());
    assert_ne!(other.expected_hash(), row.hash);
}

#[test]
fn hash_survives_a_json_round_trip() {
    for row in chain(6) {
        // Whole row, as the API returns it.
        let text = serde_json::to_string(&row).unwrap();
        let back: OperationRow = serde_json::from_str(&text).unwrap();
        assert_eq!(back, row);
        assert_eq!(back.expected_hash(), row.hash);
        // Columns, as the store keeps them: change and requester as separate texts.
        let change: Value =
            serde_json::from_str(&serde_json::to_string(&row.change).unwrap()).unwrap();
        let requester: Requester =
            serde_json::from_str(&serde_json::to_string(&row.requester).unwrap()).unwrap();
        let rebuilt = OperationRow {
            change,
            requester,
            ..row.clone()
        };
        assert_eq!(rebuilt.expected_hash(), row.hash);
    }
    // Key order in the stored text does not matter.
    let a: Value = serde_json::from_str(r#"{"b":1,"a":{"d":2,"c":3}}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"a":{"c":3,"d":2},"b":1}"#).unwrap();
    let mut o = op(1);
    o.change = a;
    let h1 = row_hash(GENESIS_HASH, 1, 1, &o);
    o.change = b;
    assert_eq!(h1, row_hash(GENESIS_HASH, 1, 1, &o));
}

#[test]
fn floats_survive_a_json_round_trip() {
    let mut o = op(1);
    o.change =
        json!({"ratio": 0.1, "x": [1.0e-300, 2.5, 1.0 / 3.0, 123_456.789, 5e-324, f64::MAX]});
    let row = OperationRow::seal(1, 5, GENESIS_HASH, o);
    let text = serde_json::to_string(&row.change).unwrap();
    let change: Value = serde_json::from_str(&text).unwrap();
    let back = OperationRow {
        change,
        ..row.clone()
    };
    assert_eq!(back.expected_hash(), row.hash);
}

#[test]
fn canonical_json_is_stable() {
    // The exact bytes hashed: fields in fixed order, object keys sorted.
    let o = NewOperation {
        requester: Requester {
            uid: 1,
            gid: 2,
            pid: 3,
            agent: None,
        },
        action: "a".into(),
        target: None,
        authority: "b".into(),
        change: json!({"z": 1, "a": [true]}),
        rollback: "c".into(),
    };
    let text = serde_json::to_string(&Hashed {
        seq: 7,
        time_ms: 8,
        requester: &o.requester,
        action: &o.action,
        target: o.target.as_deref(),
        authority: &o.authority,
        change: Canonical(&o.change),
        rollback: &o.rollback,
    })
    .unwrap();
    assert_eq!(
        text,
        r#"{"seq":7,"time_ms":8,"requester":{"uid":1,"gid":2,"pid":3},"action":"a","target":null,"authority":"b","change":{"a":[true],"z":1},"rollback":"c"}"#
    );
}

#[test]
fn edited_row_is_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows[6].authority = "x".into();
    let r = verify(rows, a);
    assert!(!r.ok);
    assert_eq!(r.bad_seq, Some(7));
    assert_eq!(
        r.problem.as_deref(),
        Some("row 7 was edited: its content no longer matches its hash")
    );
    assert_eq!(r.rows, 10);
    assert_eq!(r.head_seq, 10);
}

#[test]
fn edited_change_is_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows[2].change["state"] = json!("running");
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(3));
    assert!(r.problem.unwrap().contains("edited"));
}

#[test]
fn removed_row_is_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows.remove(6);
    let r = verify(rows, a);
    assert!(!r.ok);
    assert_eq!(r.bad_seq, Some(7));
    assert_eq!(
        r.problem.as_deref(),
        Some("row 7 is missing: row 8 follows row 6")
    );
    assert_eq!(r.rows, 9);
}

#[test]
fn removed_rows_are_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows.drain(3..6);
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(4));
    assert_eq!(
        r.problem.as_deref(),
        Some("rows 4 to 6 are missing: row 7 follows row 3")
    );
}

#[test]
fn reordered_rows_are_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows.swap(6, 7);
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(7));
    assert_eq!(
        r.problem.as_deref(),
        Some("rows 7 and 8 are out of order: row 8 comes before row 7")
    );
}

#[test]
fn row_out_of_place_is_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    let moved = rows.remove(2);
    rows.insert(5, moved); // ... 2, 4, 5, 3, ...
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(3));
    assert!(r.problem.unwrap().contains("row 3 is missing"));
}

#[test]
fn broken_link_is_named() {
    // Row 8 replaced by a validly sealed row that was chained onto row 6: its own
    // hash is right, but it does not follow row 7.
    let mut rows = chain(10);
    let a = anchor(&rows);
    let forked = OperationRow::seal(8, rows[7].time_ms, &rows[5].hash, op(8));
    rows[7] = forked;
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(8));
    assert!(
        r.problem
            .as_deref()
            .unwrap()
            .starts_with("row 8 does not follow row 7 in the chain"),
        "{r:?}"
    );
}

#[test]
fn resealed_row_breaks_the_next_link() {
    // Row 5 edited and re-sealed (its own hash fixed up): row 6 no longer follows it.
    let mut rows = chain(10);
    let a = anchor(&rows);
    let mut o = op(5);
    o.authority = "forged".into();
    rows[4] = OperationRow::seal(5, rows[4].time_ms, &rows[3].hash, o);
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(6));
    assert!(
        r.problem
            .unwrap()
            .starts_with("row 6 does not follow row 5")
    );
}

#[test]
fn removed_tail_is_named() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows.pop();
    let r = verify(rows.clone(), a.clone());
    assert!(!r.ok);
    assert_eq!(r.bad_seq, Some(10));
    assert_eq!(
        r.problem.as_deref(),
        Some("row 10 is missing: the recorded chain head is row 10, but the last row is row 9")
    );
    assert_eq!(r.head_seq, 9);
    // Without the anchor the shorter chain looks fine: that is what the anchor is for.
    assert!(verify(rows.clone(), None).ok);
    // Everything removed.
    let r = verify(Vec::new(), a);
    assert_eq!(r.bad_seq, Some(1));
    assert!(r.problem.unwrap().starts_with("rows 1 to 10 are missing"));
}

#[test]
fn appended_and_rewritten_tails_are_named() {
    let rows = chain(10);
    let r = verify(rows.clone(), Some((9, rows[8].hash.clone())));
    assert_eq!(r.bad_seq, Some(10));
    assert!(r.problem.unwrap().contains("added behind agentd's back"));
    let r = verify(rows, Some((10, "f".repeat(64))));
    assert_eq!(r.bad_seq, Some(10));
    assert!(r.problem.unwrap().contains("chain was rewritten"));
}

#[test]
fn first_row_must_be_seq_1() {
    let rows: Vec<_> = chain(5).into_iter().skip(2).collect();
    let r = verify(rows, None);
    assert_eq!(r.bad_seq, Some(1));
    assert_eq!(
        r.problem.as_deref(),
        Some("rows 1 to 2 are missing: the log starts at row 3")
    );
}

#[test]
fn first_row_must_start_from_genesis() {
    let mut rows = chain(3);
    rows[0] = OperationRow::seal(1, 1, &"a".repeat(64), op(1));
    let r = verify(rows, None);
    assert_eq!(r.bad_seq, Some(1));
    assert!(
        r.problem
            .unwrap()
            .starts_with("row 1 does not start the chain")
    );
}

#[test]
fn first_problem_wins() {
    let mut rows = chain(10);
    let a = anchor(&rows);
    rows[3].action = "x".into();
    rows[8].action = "y".into();
    rows.pop();
    let r = verify(rows, a);
    assert_eq!(r.bad_seq, Some(4));
    assert_eq!(r.rows, 9);
}

#[test]
fn daemon_requester() {
    let d = Requester::daemon();
    assert_eq!((d.uid, d.gid), (0, 0));
    assert_eq!(d.pid as u32, std::process::id());
    assert_eq!(d.agent.as_deref(), Some("agentd"));
    // agent is left out of JSON when absent.
    let text = serde_json::to_string(&Requester { agent: None, ..d }).unwrap();
    assert!(!text.contains("agent"));
}
