//! Regions in the daemon: the registry (records in the store, each region's live state
//! and counters), the API (create, publish, revoke, list, inspect), the grant at submit
//! and the policy hook that decides every open a job makes through its
//! `/run/agentd/regions.sock` (region::session). Every create, publish, revoke, open
//! (allowed or refused), kept write and failed access is an operation row.

mod delete;
pub use delete::delete;

use super::jobs::{ApiError, deny, who};
use super::{Daemon, daemon_op, now_ms};
use crate::api::types::{EventKind, RegionCreateRequest, RegionFailure, RegionView};
use crate::audit::{NewOperation, Requester};
use crate::region::broker::{Hooks, Injected, Live};
use crate::region::content::Content;
use crate::region::session::{self, Allowed, Broker, Refusal};
use crate::region::stats::Counters;
use crate::region::store::{BASE, RegionFiles};
use crate::region::{Base, MAX_SIZE, RegionGrant, RegionInfo, RegionState, check_name};
use crate::store::WriteBatch;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

type RegionStats = (String, crate::region::stats::StatsView);
type JobRegionStats = (String, String, crate::region::stats::StatsView);

/// Failures kept per region for `inspect` (the operation table has them all).
const KEPT_FAILURES: usize = 16;

pub struct Regions {
    pub files: RegionFiles,
    infos: Mutex<BTreeMap<String, RegionInfo>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Per job, per region: what the job's handles did.
    job_stats: Mutex<HashMap<String, BTreeMap<String, Arc<Counters>>>>,
    failures: Mutex<HashMap<String, VecDeque<RegionFailure>>>,
    listeners: Mutex<HashMap<String, session::Listener>>,
    /// One create, publish or revoke at a time.
    changing: tokio::sync::Mutex<()>,
    pub injected: Arc<Injected>,
}

impl Regions {
    /// The regions of the last run, from the store. Layer files of a region whose
    /// record says it has none (a publish that crashed before removing them) go.
    pub fn load(
        store: &crate::store::Store,
        state_dir: &std::path::Path,
    ) -> Result<Regions, String> {
        let files = RegionFiles::new(state_dir);
        files.ensure().map_err(|e| e.to_string())?;
        let infos = store.regions().map_err(|e| e.to_string())?;
        let mut live = HashMap::new();
        for r in &infos {
            if r.layer_pages == 0 {
                files.remove_layer(&r.name);
            }
            live.insert(
                r.name.clone(),
                Arc::new(Live::new(r.generation, r.state == RegionState::Revoked)),
            );
        }
        // What a crash between a recorded delete and its sweep left behind.
        match files.sweep(
            &manifests_in_use(&infos),
            &infos.iter().map(|r| r.name.clone()).collect(),
        ) {
            Ok(swept) if swept != Default::default() => {
                tracing::info!("regions: removed what deleted regions left: {swept:?}")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("regions: store not swept: {e}"),
        }
        Ok(Regions {
            files,
            infos: Mutex::new(infos.into_iter().map(|r| (r.name.clone(), r)).collect()),
            live: Mutex::new(live),
            job_stats: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            changing: tokio::sync::Mutex::new(()),
            injected: Arc::new(Injected::from_env()),
        })
    }

    pub fn info(&self, name: &str) -> Option<RegionInfo> {
        self.infos.lock().expect("regions lock").get(name).cloned()
    }

    fn live(&self, name: &str) -> Option<Arc<Live>> {
        self.live.lock().expect("regions lock").get(name).cloned()
    }

    fn view(&self, info: RegionInfo, job: Option<&str>) -> RegionView {
        let live = self.live(&info.name);
        let stats = match job {
            Some(j) => self
                .job_stats
                .lock()
                .expect("regions lock")
                .get(j)
                .and_then(|m| m.get(&info.name))
                .map(|c| c.snapshot())
                .unwrap_or_default(),
            None => live
                .as_ref()
                .map(|l| l.stats.snapshot())
                .unwrap_or_default(),
        };
        let failures = self
            .failures
            .lock()
            .expect("regions lock")
            .get(&info.name)
            .map(|f| {
                f.iter()
                    .filter(|x| job.is_none_or(|j| x.job == j))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let open = live
            .as_ref()
            .map(|l| {
                l.open
                    .lock()
                    .expect("open handles lock")
                    .values()
                    .filter(|h| job.is_none_or(|j| h.job == j))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        RegionView {
            open,
            handles: live.map_or(0, |l| l.handles.load(std::sync::atomic::Ordering::SeqCst)),
            info,
            stats,
            failures,
        }
    }

    /// Every region (with `job`: only those the job used, and its own counters).
    pub fn list(&self, job: Option<&str>) -> Vec<RegionView> {
        let infos: Vec<RegionInfo> = self
            .infos
            .lock()
            .expect("regions lock")
            .values()
            .cloned()
            .collect();
        let used: Option<Vec<String>> = job.map(|j| {
            self.job_stats
                .lock()
                .expect("regions lock")
                .get(j)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        });
        infos
            .into_iter()
            .filter(|i| used.as_ref().is_none_or(|u| u.contains(&i.name)))
            .map(|i| self.view(i, job))
            .collect()
    }

    pub fn get(&self, name: &str, job: Option<&str>) -> Result<RegionView, ApiError> {
        let info = self.info(name).ok_or_else(|| no_such_region(name))?;
        Ok(self.view(info, job))
    }

    fn job_counters(&self, job: &str, region: &str) -> Arc<Counters> {
        self.job_stats
            .lock()
            .expect("regions lock")
            .entry(job.to_owned())
            .or_default()
            .entry(region.to_owned())
            .or_default()
            .clone()
    }

    /// Every region counter set, for /metrics: (region, stats) and (job, region, stats).
    pub fn all_stats(&self) -> (Vec<RegionStats>, Vec<JobRegionStats>) {
        let regions = self
            .live
            .lock()
            .expect("regions lock")
            .iter()
            .map(|(n, l)| (n.clone(), l.stats.snapshot()))
            .collect();
        let jobs = self
            .job_stats
            .lock()
            .expect("regions lock")
            .iter()
            .flat_map(|(j, m)| {
                m.iter()
                    .map(move |(r, c)| (j.clone(), r.clone(), c.snapshot()))
            })
            .collect();
        (regions, jobs)
    }

    /// A change is recorded: the handles see its generation and state, readers its
    /// record.
    fn settle(&self, after: &RegionInfo) {
        if let Some(live) = self.live(&after.name) {
            use std::sync::atomic::Ordering::SeqCst;
            live.revoked
                .store(after.state == RegionState::Revoked, SeqCst);
            live.generation.store(after.generation, SeqCst);
        }
        self.infos
            .lock()
            .expect("regions lock")
            .insert(after.name.clone(), after.clone());
    }

    /// A job that is forgotten (pruned) takes its counters with it.
    pub fn forget_job(&self, job: &str) {
        self.job_stats.lock().expect("regions lock").remove(job);
    }
}

/// The manifests the regions' bases name (a clone's inherited base included).
fn manifests_in_use<'a>(
    infos: impl IntoIterator<Item = &'a RegionInfo>,
) -> std::collections::HashSet<String> {
    infos
        .into_iter()
        .filter_map(|r| match &r.base {
            Base::Chunks { manifest } => Some(manifest.clone()),
            _ => None,
        })
        .collect()
}

fn no_such_region(name: &str) -> ApiError {
    ApiError::not_found(format!("no region {name} (agentctl region ls lists them)"))
}

fn may_manage(r: &Requester, info: &RegionInfo) -> bool {
    r.uid == 0 || r.uid == info.owner_uid
}

/// POST /v1/regions
pub async fn create(
    d: &Arc<Daemon>,
    req: RegionCreateRequest,
    requester: Requester,
) -> Result<RegionView, ApiError> {
    check_name(&req.name).map_err(ApiError::bad_request)?;
    let sources = [
        req.from_file.is_some(),
        req.zero.is_some(),
        req.clone.is_some(),
    ];
    if sources.iter().filter(|&&s| s).count() != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of from_file (a file's bytes), zero (a size) or clone (a parent region)",
        ));
    }
    let regions = &d.regions;
    let _one = regions.changing.lock().await;
    if regions.info(&req.name).is_some() {
        return Err(ApiError::conflict(format!(
            "region {} exists already (agentctl region inspect {0})",
            req.name
        )));
    }
    let mut info = RegionInfo {
        name: req.name.clone(),
        size: 0,
        generation: 1,
        state: RegionState::Active,
        base: Base::Zero,
        base_inherited: false,
        layer_pages: 0,
        parent: None,
        created_ms: now_ms(),
        published_ms: None,
        revoked_ms: None,
        owner_uid: requester.uid,
    };
    let mut authority = format!(
        "{} may manage regions ({})",
        who(&requester),
        crate::api::server::access_rule(d, &requester)
    );
    if let Some(path) = &req.from_file {
        let (canonical, size) = backing_file(d, &requester, path).await?;
        info.size = size;
        info.base = Base::File { path: canonical };
        if requester.uid != 0 {
            authority.push_str("; the requester owns the file");
        }
    } else if let Some(size) = &req.zero {
        let bytes = crate::spec::parse_size(size)
            .map_err(|m| ApiError::bad_request(format!("zero: {m}")))?;
        if !(1..=MAX_SIZE).contains(&bytes) {
            return Err(ApiError::bad_request(format!(
                "zero: {bytes} bytes: expected 1 byte to 1T"
            )));
        }
        info.size = bytes;
    } else if let Some(parent) = &req.clone {
        let p = regions.info(parent).ok_or_else(|| no_such_region(parent))?;
        if p.state == RegionState::Revoked {
            return Err(ApiError::conflict(format!(
                "region {parent} is revoked: it cannot be cloned"
            )));
        }
        let files = regions.files.clone();
        let (from, to, pages) = (p.name.clone(), info.name.clone(), p.pages());
        let live = regions.live(parent).expect("a region has its live state");
        let held = tokio::task::spawn_blocking(move || {
            // The parent's layer as it is now: no write-back lands halfway.
            let _steady = live.write_lock.lock();
            files.inherit_layer(&from, &to, pages)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("cannot copy the parent's layer: {e}")))?;
        info.size = p.size;
        info.base = p.base.clone();
        info.base_inherited = true;
        info.layer_pages = held;
        info.parent = Some(parent.clone());
        authority.push_str(&format!(
            "; clone of {parent} at generation {}",
            p.generation
        ));
    }
    let batch = WriteBatch {
        regions: vec![info.clone()],
        ops: vec![NewOperation {
            requester: requester.clone(),
            action: "region.create".into(),
            target: Some(info.name.clone()),
            authority,
            change: serde_json::json!({"region": info.name, "size": info.size, "base": info.base,
                "parent": info.parent, "generation": 1}),
            rollback: format!("agentctl region revoke {}", info.name),
        }],
        ..Default::default()
    };
    if let Err(e) = d.commit(batch).await {
        regions.files.remove_layer(&info.name);
        return Err(ApiError::internal(format!("cannot record the region: {e}")));
    }
    regions
        .live
        .lock()
        .expect("regions lock")
        .insert(info.name.clone(), Arc::new(Live::new(1, false)));
    regions
        .infos
        .lock()
        .expect("regions lock")
        .insert(info.name.clone(), info.clone());
    d.events.emit(
        EventKind::Region,
        None,
        None,
        format!("created {} ({} bytes)", info.name, info.size),
    );
    Ok(regions.view(info, None))
}

/// The file a region will serve: absolute, a regular file, not empty; a caller other
/// than root must own it (the daemon reads it as root).
async fn backing_file(
    d: &Daemon,
    requester: &Requester,
    path: &str,
) -> Result<(String, u64), ApiError> {
    use std::os::unix::fs::MetadataExt;
    if !path.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "from_file: expected an absolute path, got {path:?}"
        )));
    }
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| ApiError::bad_request(format!("from_file {path}: {e}")))?;
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| ApiError::bad_request(format!("from_file {path}: {e}")))?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(ApiError::bad_request(format!(
            "from_file {path}: expected a regular file that is not empty"
        )));
    }
    if requester.uid != 0 && meta.uid() != requester.uid {
        let why = format!(
            "from_file {path} belongs to uid {}, not to the requester (uid {}); the daemon reads it as root",
            meta.uid(),
            requester.uid
        );
        deny(
            d,
            requester,
            "region.create",
            None,
            "region file ownership",
            &why,
        )
        .await;
        return Err(ApiError::forbidden(why));
    }
    Ok((canonical.display().to_string(), meta.len()))
}

/// POST /v1/regions/NAME/publish: the region's content as it is now becomes chunks in
/// the store (shared by hash with every other publish); the generation moves on, so the
/// handles of the old one fail at their next fault.
pub async fn publish(
    d: &Arc<Daemon>,
    name: &str,
    requester: Requester,
) -> Result<RegionView, ApiError> {
    let regions = &d.regions;
    let _one = regions.changing.lock().await;
    let info = regions.info(name).ok_or_else(|| no_such_region(name))?;
    change_allowed(d, &requester, &info, "region.publish").await?;
    let live = regions.live(name).expect("a region has its live state");
    let files = regions.files.clone();
    let before = info.clone();
    let (manifest, stored, zero) = tokio::task::spawn_blocking(move || {
        let _steady = live.write_lock.lock();
        fold_into_chunks(&files, &before)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::new(500, format!("cannot publish region {name}: {e}")))?;
    let mut after = info.clone();
    after.base = Base::Chunks {
        manifest: manifest.clone(),
    };
    after.base_inherited = false;
    after.layer_pages = 0;
    after.generation += 1;
    after.published_ms = Some(now_ms());
    let batch = WriteBatch {
        regions: vec![after.clone()],
        ops: vec![NewOperation {
            requester: requester.clone(),
            action: "region.publish".into(),
            target: Some(name.to_owned()),
            authority: format!(
                "{} may manage region {name} ({})",
                who(&requester),
                owner_rule(&requester)
            ),
            change: serde_json::json!({"region": name,
                "generation": {"before": info.generation, "after": after.generation},
                "base": {"before": info.base, "after": after.base},
                "chunks_stored": stored, "chunks_zero": zero}),
            rollback: format!(
                "none by agentd: generation {} is gone (its chunks stay while a manifest names them); handles of it fail",
                info.generation
            ),
        }],
        ..Default::default()
    };
    d.commit(batch)
        .await
        .map_err(|e| ApiError::internal(format!("cannot record the publish: {e}")))?;
    regions.files.remove_layer(name);
    regions.settle(&after);
    d.events.emit(
        EventKind::Region,
        None,
        None,
        format!("published {name} at generation {}", after.generation),
    );
    Ok(regions.view(after, None))
}

/// Reads every page of `info` as it is and stores it as chunks; returns the manifest
/// id, chunks written (or found), and zero chunks.
fn fold_into_chunks(files: &RegionFiles, info: &RegionInfo) -> Result<(String, u64, u64), String> {
    use crate::region::{CHUNK, PAGE};
    let mut content = Content::open(files, info)?;
    let mut chunks = Vec::new();
    let (mut stored, mut zero) = (0, 0);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut page = vec![0u8; PAGE as usize];
    let per_chunk = CHUNK / PAGE;
    for ci in 0..info.size.div_ceil(CHUNK) {
        let len = (info.size - ci * CHUNK).min(CHUNK) as usize;
        for p in 0..per_chunk {
            let at = (p * PAGE) as usize;
            if at >= len {
                break;
            }
            content
                .read_page(ci * per_chunk + p, &mut page)
                .map_err(|f| format!("{f:?}"))?;
            let n = (len - at).min(PAGE as usize);
            buf[at..at + n].copy_from_slice(&page[..n]);
        }
        let bytes = &buf[..len];
        if bytes.iter().all(|&b| b == 0) {
            zero += 1;
            chunks.push(None);
        } else {
            stored += 1;
            chunks.push(Some(files.put_chunk(bytes).map_err(|e| e.to_string())?));
        }
    }
    let manifest = crate::region::store::Manifest {
        size: info.size,
        chunk: CHUNK,
        chunks,
    };
    let id = files.put_manifest(&manifest).map_err(|e| e.to_string())?;
    Ok((id, stored, zero))
}

fn owner_rule(r: &Requester) -> &'static str {
    if r.uid == 0 { "root" } else { "its creator" }
}

async fn change_allowed(
    d: &Daemon,
    requester: &Requester,
    info: &RegionInfo,
    action: &str,
) -> Result<(), ApiError> {
    if !may_manage(requester, info) {
        let why = format!(
            "region {} belongs to uid {}; only it and root may change it",
            info.name, info.owner_uid
        );
        deny(d, requester, action, Some(&info.name), "region owner", &why).await;
        return Err(ApiError::forbidden(why));
    }
    if info.state == RegionState::Revoked {
        return Err(ApiError::conflict(format!(
            "region {} is revoked already",
            info.name
        )));
    }
    Ok(())
}

/// POST /v1/regions/NAME/revoke: no new opens; open handles fail at their next fault.
pub async fn revoke(
    d: &Arc<Daemon>,
    name: &str,
    requester: Requester,
) -> Result<RegionView, ApiError> {
    let regions = &d.regions;
    let _one = regions.changing.lock().await;
    let info = regions.info(name).ok_or_else(|| no_such_region(name))?;
    change_allowed(d, &requester, &info, "region.revoke").await?;
    let mut after = info.clone();
    after.state = RegionState::Revoked;
    after.generation += 1;
    after.revoked_ms = Some(now_ms());
    let live = regions.live(name).expect("a region has its live state");
    let open = live.handles.load(std::sync::atomic::Ordering::SeqCst);
    let batch = WriteBatch {
        regions: vec![after.clone()],
        ops: vec![NewOperation {
            requester: requester.clone(),
            action: "region.revoke".into(),
            target: Some(name.to_owned()),
            authority: format!(
                "{} may manage region {name} ({})",
                who(&requester),
                owner_rule(&requester)
            ),
            change: serde_json::json!({"region": name, "state": {"before": "active", "after": "revoked"},
                "generation": {"before": info.generation, "after": after.generation},
                "open_handles": open}),
            rollback: "none: a revoked region stays revoked; create a new one from the same source"
                .into(),
        }],
        ..Default::default()
    };
    d.commit(batch)
        .await
        .map_err(|e| ApiError::internal(format!("cannot record the revoke: {e}")))?;
    regions.settle(&after);
    d.events.emit(
        EventKind::Region,
        None,
        None,
        format!("revoked {name} ({open} open handle(s) fail at their next fault)"),
    );
    Ok(regions.view(after, None))
}

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
    let path = super::jobsock::dir(d, id).join("regions.sock");
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
fn job_requester(e: &super::JobEntry) -> Requester {
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
