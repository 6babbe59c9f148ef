//! Regions from a job's side: the grant at submit, the job's region socket, the policy
//! hook that decides each open, and the broker's hooks (failures, kept writes).

use super::*;

/// At submit: the regions the job asks for, each granted by the policy at the access
/// asked, existing and not revoked; and the kernel must offer /dev/userfaultfd.
pub async fn grant(
    d: &Daemon,
    asked: &[String],
    policy: &crate::spec::Policy,
    requester: &Requester,
) -> Result<Vec<RegionGrant>, ApiError> {
    let mut grants: Vec<RegionGrant> = Vec::new();
    for a in asked {
        let (name, write) = crate::region::parse_grant_request(a)
            .map_err(|m| ApiError::bad_request(format!("regions: {m}")))?;
        if grants.iter().any(|g| g.name == name) {
            return Err(ApiError::bad_request(format!(
                "regions: {name} is given twice"
            )));
        }
        let Some(rule) = crate::spec::regions::granting(&policy.regions, &name, write) else {
            let access = if write { "read-write" } else { "read-only" };
            let why = format!(
                "policy {} does not grant region {name} {access} (its [regions] allow: {:?})",
                policy.name,
                policy
                    .regions
                    .iter()
                    .map(|r| format!("{}{}", r.pattern, if r.write { ":rw" } else { "" }))
                    .collect::<Vec<_>>()
            );
            deny(d, requester, "job.submit", None, "regions.allow", &why).await;
            return Err(ApiError::forbidden(why));
        };
        match d.regions.info(&name) {
            None => return Err(no_such_region(&name)),
            Some(i) if i.state == RegionState::Revoked => {
                return Err(ApiError::conflict(format!("region {name} is revoked")));
            }
            Some(_) => {}
        }
        grants.push(RegionGrant {
            name,
            write,
            rule: format!("{}:{}", policy.name, rule.rule),
        });
    }
    if !grants.is_empty() && !std::path::Path::new("/dev/userfaultfd").exists() {
        let why = "regions need /dev/userfaultfd (Linux 6.1 or later with CONFIG_USERFAULTFD); this host has none";
        deny(d, requester, "job.submit", None, "host features", why).await;
        return Err(ApiError::new(422, why));
    }
    Ok(grants)
}

/// The job's region socket, when it was given regions: `<job socket dir>/regions.sock`,
/// so the job finds it at /run/agentd/regions.sock.
pub fn listen(d: &Arc<Daemon>, id: &str, grants: &[RegionGrant]) -> std::io::Result<()> {
    if grants.is_empty() {
        return Ok(());
    }
    let weak = Arc::downgrade(d);
    let job = id.to_owned();
    let decide = move |name: &str, write: bool| -> Result<Allowed, Refusal> {
        let d = weak.upgrade().ok_or(Refusal {
            kind: "unavailable",
            why: "the daemon is stopping".into(),
        })?;
        decide(&d, &job, name, write)
    };
    let broker = Broker {
        job: id.to_owned(),
        decide: Box::new(decide),
        hooks: Arc::new(DaemonHooks {
            d: Arc::downgrade(d),
            rt: d.rt.clone(),
        }),
        injected: d.regions.injected.clone(),
        active: Default::default(),
    };
    let path = crate::daemon::jobsock::dir(d, id).join("regions.sock");
    let listener = session::listen(&path, broker)?;
    d.regions
        .listeners
        .lock()
        .expect("regions lock")
        .insert(id.to_owned(), listener);
    Ok(())
}

/// The job ended: no more opens (its handles ended with its processes).
pub fn stop(d: &Daemon, id: &str) {
    let l = d.regions.listeners.lock().expect("regions lock").remove(id);
    drop(l);
}

/// The policy hook for one open: the job runs, was given the region at this access,
/// and the region is there and not revoked. Allowed or not, it is an operation row.
fn decide(d: &Arc<Daemon>, job: &str, name: &str, write: bool) -> Result<Allowed, Refusal> {
    let (grant, requester) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let Some(e) = jobs.get(job).filter(|e| !e.info.state.is_terminal()) else {
            return Err(Refusal {
                kind: "unavailable",
                why: format!("job {job} is not running"),
            });
        };
        (
            e.runtime.regions.iter().find(|g| g.name == name).cloned(),
            job_requester(e),
        )
    };
    let refuse = |kind: &'static str, why: String| Refusal { kind, why };
    let refusal = match &grant {
        None => Some(refuse(
            "not-granted",
            format!("job {job} was not given region {name} (agentctl run --region {name})"),
        )),
        Some(g) if write && !g.write => Some(refuse(
            "not-granted",
            format!(
                "job {job} was given region {name} read-only (agentctl run --region {name}:rw for writes)"
            ),
        )),
        _ => None,
    };
    let info = d.regions.info(name);
    let refusal = refusal.or_else(|| match &info {
        None => Some(refuse("no-such-region", format!("no region {name}"))),
        Some(i) if i.state == RegionState::Revoked => Some(refuse(
            "revoked",
            format!("region {name} was revoked (generation {})", i.generation),
        )),
        _ => None,
    });
    let rt = &d.rt;
    if let Some(r) = refusal {
        let rule = match r.kind {
            "not-granted" => "region grant",
            "revoked" => "region state",
            _ => "region",
        };
        rt.block_on(deny(d, &requester, "region.open", Some(job), rule, &r.why));
        return Err(r);
    }
    let (grant, info) = (grant.expect("granted"), info.expect("exists"));
    let content = Content::open(&d.regions.files, &info).map_err(|why| Refusal {
        kind: "unavailable",
        why: format!("region {name}: {why}"),
    })?;
    let live = d.regions.live(name).expect("a region has its live state");
    rt.block_on(d.record_op(NewOperation {
        requester,
        action: "region.open".into(),
        target: Some(job.to_owned()),
        authority: format!(
            "job {job} was given {name}:{} by {}",
            if grant.write { "rw" } else { "ro" },
            grant.rule
        ),
        change: serde_json::json!({"job": job, "region": name, "generation": info.generation,
            "write": write}),
        rollback: format!("agentctl region revoke {name} (its handles fail), or end the job"),
    }));
    let charge = d
        .classes
        .charge(
            crate::telemetry::classes::Class::RegionHandle,
            Some(job),
            1,
            content.held_bytes(),
            Default::default(),
        )
        .ok();
    Ok(Allowed {
        live,
        content,
        job_stats: d.regions.job_counters(job, name),
        charge,
    })
}

/// What a job asks for itself is asked by its user and agent.
fn job_requester(e: &crate::daemon::JobEntry) -> Requester {
    Requester {
        uid: e.runtime.job_uid,
        gid: e.runtime.job_gid,
        pid: 0,
        agent: Some(e.info.agent.clone()),
    }
}

struct DaemonHooks {
    d: Weak<Daemon>,
    rt: tokio::runtime::Handle,
}

impl Hooks for DaemonHooks {
    fn failed(&self, job: &str, region: &str, offset: u64, reason: &str) {
        let Some(d) = self.d.upgrade() else { return };
        {
            let mut f = d.regions.failures.lock().expect("regions lock");
            let q = f.entry(region.to_owned()).or_default();
            if q.len() == KEPT_FAILURES {
                q.pop_front();
            }
            q.push_back(RegionFailure {
                time_ms: now_ms(),
                job: job.to_owned(),
                offset,
                reason: reason.to_owned(),
            });
        }
        d.events.emit(
            EventKind::RegionFailure,
            Some(job),
            None,
            format!("{region} at offset {offset}: {reason}"),
        );
        let op = daemon_op(
            "region.fault-failed",
            job,
            format!("the broker of region {region} could not serve the access"),
            serde_json::json!({"job": job, "region": region, "offset": offset, "reason": reason,
                "outcome": "SIGBUS"}),
            "nothing to undo: the job's access failed, no data changed",
        );
        self.rt.block_on(d.record_op(op));
    }

    fn written(&self, job: &str, region: &str, pages: &[(u64, Vec<u8>)]) -> Result<(), String> {
        let d = self.d.upgrade().ok_or("the daemon is stopping")?;
        let info = d.regions.info(region).ok_or("the region is gone")?;
        let files = &d.regions.files;
        let mut map = if info.layer_pages == 0 {
            vec![BASE; info.pages() as usize]
        } else {
            files
                .load_map(region, info.pages())
                .map_err(|e| e.to_string())?
        };
        files
            .write_layer(region, info.size, pages, &mut map)
            .map_err(|e| e.to_string())?;
        let mut after = info.clone();
        after.layer_pages = map.iter().filter(|&&b| b != BASE).count() as u64;
        let requester = d
            .jobs
            .lock()
            .expect("jobs lock")
            .get(job)
            .map(job_requester)
            .unwrap_or_else(Requester::daemon);
        let batch = WriteBatch {
            regions: vec![after.clone()],
            ops: vec![NewOperation {
                requester,
                action: "region.write".into(),
                target: Some(region.to_owned()),
                authority: format!("job {job} had region {region} read-write"),
                change: serde_json::json!({"job": job, "region": region, "pages_written": pages.len(),
                    "layer_pages": {"before": info.layer_pages, "after": after.layer_pages}}),
                rollback: format!(
                    "none by agentd: the pages replaced the region's own; a clone keeps its parent's ({})",
                    info.parent.as_deref().unwrap_or("no parent")
                ),
            }],
            ..Default::default()
        };
        self.rt
            .block_on(d.commit(batch))
            .map_err(|e| format!("cannot record the write: {e}"))?;
        d.regions.settle(&after);
        Ok(())
    }

    fn closed(&self, _job: &str, _region: &str) {}
}
