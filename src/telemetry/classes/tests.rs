use super::*;
use serde_json::json;

fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

fn declared(class: Class, pred: impl Fn(Export) -> bool) -> Vec<String> {
    let mut k: Vec<String> = class
        .spec()
        .fields
        .iter()
        .filter(|f| pred(f.export))
        .map(|f| f.name.to_owned())
        .collect();
    k.sort();
    k
}

#[test]
fn charges_are_counted_per_class_and_job_and_returned_on_drop() {
    let acct = Arc::new(Accounting::default());
    let a = acct
        .charge(Class::ToolCall, Some("j1"), 2, 100, Quota::default())
        .unwrap();
    let mut b = acct
        .charge(Class::ToolCall, Some("j2"), 1, 50, Quota::default())
        .unwrap();
    b.grow(1, 10, Quota::default()).unwrap();
    let held = |j: &str| {
        let c = acct.held(j, Class::ToolCall);
        (c.live, c.bytes, c.high_live, c.allocs)
    };
    assert_eq!(held("j1"), (2, 100, 2, 2));
    assert_eq!(held("j2"), (2, 60, 2, 2));
    let (classes, jobs) = acct.stats(None);
    let tc = classes.iter().find(|c| c.name == "tool_call").unwrap();
    assert_eq!((tc.live, tc.bytes, tc.allocs_total), (4, 160, 4));
    assert_eq!(jobs.len(), 2);
    drop(a);
    b.shrink(1, 10);
    drop(b);
    let (classes, jobs) = acct.stats(None);
    let tc = classes.iter().find(|c| c.name == "tool_call").unwrap();
    assert_eq!((tc.live, tc.bytes), (0, 0));
    assert_eq!((tc.high_water_live, tc.high_water_bytes), (4, 160));
    assert!(jobs.is_empty(), "a job that holds nothing leaves the table");
}

#[test]
fn a_charge_past_the_quota_is_refused_and_takes_nothing() {
    let acct = Arc::new(Accounting::default());
    let q = Quota {
        objects: Some(2),
        bytes: Some(1000),
    };
    let mut c = acct
        .charge(Class::ContextSegment, Some("j"), 1, 600, q)
        .unwrap();
    let err = c.grow(1, 500, q).unwrap_err();
    assert_eq!(
        (err.bound, err.limit, err.held, err.asked),
        ("bytes", 1000, 600, 500)
    );
    assert!(
        err.to_string()
            .contains("holds 600 bytes of context_segment"),
        "{err}"
    );
    c.grow(1, 400, q).unwrap();
    let err = acct
        .charge(Class::ContextSegment, Some("j"), 1, 0, q)
        .unwrap_err();
    assert_eq!(err.bound, "objects");
    let held = acct.held("j", Class::ContextSegment);
    assert_eq!((held.live, held.bytes, held.high_bytes), (2, 1000, 1000));
    // Another job has its own quota.
    let _other = acct
        .charge(Class::ContextSegment, Some("k"), 1, 900, q)
        .unwrap();
}

#[test]
fn the_rate_comes_from_samples() {
    let acct = Arc::new(Accounting::default());
    acct.sample();
    acct.add_global(Class::Event, 50, 5000);
    std::thread::sleep(std::time::Duration::from_millis(100));
    acct.sample();
    let (classes, _) = acct.stats(None);
    let ev = classes.iter().find(|c| c.name == "event").unwrap();
    assert!(ev.allocs_per_sec > 50.0, "{}", ev.allocs_per_sec);
}

#[test]
fn export_keeps_only_declared_fields_for_the_audience() {
    let call = json!({"name": "grep", "status": "ok", "time_ms": 1, "args_digest": "ab",
        "args_bytes": 9, "args": {"token": "s3cret"}, "undeclared": 1});
    let agent = export(Class::ToolCall, &call, Audience::Agent);
    assert_eq!(keys(&agent), ["args_digest", "name", "status", "time_ms"]);
    let operator = export(Class::ToolCall, &json!([call]), Audience::Operator);
    assert_eq!(
        keys(&operator[0]),
        ["args_bytes", "args_digest", "name", "status", "time_ms"]
    );
}

#[test]
fn a_tool_calls_serialization_is_its_declaration() {
    let call: crate::api::types::ToolCall = serde_json::from_value(json!({
        "name": "grep", "status": "ok", "args": {"token": "s3cret"}, "args_digest": "ab"}))
    .unwrap();
    let mut call = call;
    call.args_bytes = Some(17);
    let v = serde_json::to_value(&call).unwrap();
    assert_eq!(keys(&v), declared(Class::ToolCall, |e| e != Export::Never));
    assert!(!v.to_string().contains("s3cret"));
    assert!(call.args.is_some(), "kept in memory");
}

#[test]
fn events_and_operations_serialize_as_declared() {
    let ev = crate::api::types::Event {
        seq: 1,
        time_ms: 2,
        kind: crate::api::types::EventKind::Started,
        job: Some("j".into()),
        lease: Some("l".into()),
        detail: "d".into(),
    };
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(keys(&v), declared(Class::Event, |_| true));
    let op = crate::audit::NewOperation {
        requester: crate::audit::Requester::daemon(),
        action: "a".into(),
        target: Some("t".into()),
        authority: "x".into(),
        change: json!({}),
        rollback: "r".into(),
    };
    let v = serde_json::to_value(&op).unwrap();
    assert_eq!(keys(&v), declared(Class::Operation, |_| true));
}

#[test]
fn every_class_has_a_unique_name_and_fields() {
    for (i, c) in ALL.iter().enumerate() {
        assert_eq!(*c as usize, i);
        assert_eq!(Class::by_name(c.name()), Some(*c));
        assert!(!c.spec().fields.is_empty());
    }
}

#[test]
fn region_handles_serialize_as_declared() {
    let h = crate::region::broker::HandleInfo {
        job: "j".into(),
        region: "r".into(),
        generation: 1,
        write: false,
        bytes: 4096,
        opened_ms: 1,
    };
    let v = serde_json::to_value(&h).unwrap();
    assert_eq!(keys(&v), declared(Class::RegionHandle, |_| true));
}
