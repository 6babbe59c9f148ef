//! The daemon's event stream: typed lifecycle events with a sequence number, kept in a
//! bounded ring for late readers and broadcast to followers. A follower that falls
//! behind is told how many events it missed, never blocks the daemon.

use crate::api::types::{Event, EventKind};
use crate::telemetry::classes::{Accounting, Class, JobCounters};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Events kept for readers that ask for history (`since`).
const RING: usize = 4096;

pub struct EventBus {
    inner: Mutex<Ring>,
    tx: broadcast::Sender<Event>,
    /// The ring's events are charged to the `event` class.
    classes: Arc<Accounting>,
}

struct Ring {
    next_seq: u64,
    events: VecDeque<Event>,
    /// The `event` class's counters, kept here under the ring's lock and published.
    counters: JobCounters,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

/// An event's bytes in the ring.
fn event_bytes(e: &Event) -> u64 {
    (std::mem::size_of::<Event>()
        + e.detail.len()
        + e.job.as_ref().map_or(0, String::len)
        + e.lease.as_ref().map_or(0, String::len)) as u64
}

impl EventBus {
    pub fn new() -> EventBus {
        Self::with_accounting(Arc::new(Accounting::default()))
    }

    pub fn with_accounting(classes: Arc<Accounting>) -> EventBus {
        EventBus {
            classes,
            inner: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(RING),
                counters: JobCounters::default(),
            }),
            tx: broadcast::channel(1024).0,
        }
    }

    /// Records and broadcasts one event. Costs a lock and a clone when nobody listens.
    pub fn emit(&self, kind: EventKind, job: Option<&str>, lease: Option<&str>, detail: String) {
        let mut ring = self.inner.lock().expect("event ring lock");
        let event = Event {
            seq: ring.next_seq,
            time_ms: super::now_ms(),
            kind,
            job: job.map(str::to_owned),
            lease: lease.map(str::to_owned),
            detail,
        };
        ring.next_seq += 1;
        // Into the daemon's log too, with structured fields: under systemd each is a
        // journald field (EVENT=, JOB=, LEASE=, SEQ=), so `journalctl -u agentd JOB=ID`
        // selects one job's lifecycle. (Renewals, every 10 s per attached client, and allowed connections, one per
        // request a job makes, stay out of the log; they are in the stream, and the
        // job's report counts bytes per destination.)
        if kind != EventKind::LeaseRenewed && kind != EventKind::EgressAllowed {
            tracing::info!(
                event = kind_name(kind),
                job = event.job.as_deref().unwrap_or(""),
                lease = event.lease.as_deref().unwrap_or(""),
                seq = event.seq,
                "{} {}{}",
                kind_name(kind),
                event
                    .job
                    .as_deref()
                    .or(event.lease.as_deref())
                    .unwrap_or(""),
                if event.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", event.detail)
                }
            );
        }
        if ring.events.len() == RING
            && let Some(old) = ring.events.pop_front()
        {
            ring.counters.live -= 1;
            ring.counters.bytes -= event_bytes(&old);
        }
        let c = &mut ring.counters;
        c.live += 1;
        c.bytes += event_bytes(&event);
        c.allocs += 1;
        c.high_live = c.high_live.max(c.live);
        c.high_bytes = c.high_bytes.max(c.bytes);
        self.classes.publish(Class::Event, *c);
        ring.events.push_back(event.clone());
        // Sent under the lock so followers see events in seq order.
        let _ = self.tx.send(event);
    }

    /// Events after `since` still in the ring, and a receiver for the ones to come
    /// (subscribed under the same lock, so nothing falls between the two).
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.inner.lock().expect("event ring lock");
        let past = ring
            .events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        (past, self.tx.subscribe())
    }
}

/// The kind as the API spells it ("lease-expired").
pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Submitted => "submitted",
        EventKind::Admitted => "admitted",
        EventKind::Started => "started",
        EventKind::Frozen => "frozen",
        EventKind::Thawed => "thawed",
        EventKind::Exited => "exited",
        EventKind::Killed => "killed",
        EventKind::Failed => "failed",
        EventKind::Lost => "lost",
        EventKind::Adopted => "adopted",
        EventKind::Detached => "detached",
        EventKind::Denied => "denied",
        EventKind::LeaseTaken => "lease-taken",
        EventKind::LeaseRenewed => "lease-renewed",
        EventKind::LeaseReleased => "lease-released",
        EventKind::LeaseExpired => "lease-expired",
        EventKind::Accepted => "accepted",
        EventKind::Rejected => "rejected",
        EventKind::RolledBack => "rolled-back",
        EventKind::EgressAllowed => "egress-allowed",
        EventKind::EgressDenied => "egress-denied",
        EventKind::Throttled => "throttled",
        EventKind::OomKill => "oom-kill",
        EventKind::Lagged => "lagged",
        EventKind::Preempted => "preempted",
        EventKind::Resumed => "resumed",
        EventKind::DeadlineOverrun => "deadline-overrun",
        EventKind::DeadlineMiss => "deadline-miss",
        EventKind::RegionFailure => "region-failure",
        EventKind::Region => "region",
    }
}

/// A follower's filter: by job and by kinds.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub job: Option<String>,
    pub kinds: Vec<EventKind>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        if e.kind == EventKind::Lagged {
            return true;
        }
        if let Some(job) = &self.job
            && e.job.as_deref() != Some(job.as_str())
        {
            return false;
        }
        self.kinds.is_empty() || self.kinds.contains(&e.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_and_live_events_meet_without_a_gap() {
        let bus = EventBus::new();
        bus.emit(EventKind::Submitted, Some("a"), None, String::new());
        bus.emit(EventKind::Started, Some("a"), None, String::new());
        let (past, mut rx) = bus.subscribe(1);
        assert_eq!(past.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        bus.emit(EventKind::Exited, Some("a"), None, String::new());
        assert_eq!(rx.try_recv().unwrap().seq, 3);
    }

    #[test]
    fn kind_names_match_the_api() {
        for kind in [
            EventKind::LeaseExpired,
            EventKind::Accepted,
            EventKind::RolledBack,
            EventKind::Submitted,
            EventKind::Lagged,
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind_name(kind).into())
            );
        }
    }

    #[test]
    fn filter_by_job_and_kind() {
        let f = EventFilter {
            job: Some("a".into()),
            kinds: vec![EventKind::Exited],
        };
        let e = |kind, job: &str| Event {
            seq: 1,
            time_ms: 0,
            kind,
            job: Some(job.into()),
            lease: None,
            detail: String::new(),
        };
        assert!(f.matches(&e(EventKind::Exited, "a")));
        assert!(!f.matches(&e(EventKind::Started, "a")));
        assert!(!f.matches(&e(EventKind::Exited, "b")));
    }
}
