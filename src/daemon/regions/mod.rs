//! Regions in the daemon. Here: the registry (records in the store, each region's live
//! state and counters; list, inspect). `change`: the operator's create, publish and
//! revoke; `delete`: delete and the store's sweep; `jobside`: the grant at submit, the
//! job's region socket, and the policy hook that decides every open a job makes
//! through its `/run/agentd/regions.sock` (region::session). Every create, publish,
//! revoke, delete, open (allowed or refused), kept write and failed access is an
//! operation row.

mod change;
mod delete;
mod jobside;
pub use change::{create, publish, revoke};
pub use delete::delete;
pub use jobside::{grant, listen, stop};

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
        if files.sweep_pending() {
            let names = infos.iter().map(|r| r.name.clone()).collect();
            match files.sweep(&manifests_in_use(&infos), &names) {
                Ok(swept) => {
                    tracing::info!("regions: removed what deleted regions left: {swept:?}")
                }
                Err(e) => tracing::warn!("regions: store not swept (tried again next start): {e}"),
            }
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

fn owner_rule(r: &Requester) -> &'static str {
    if r.uid == 0 { "root" } else { "its creator" }
}

/// Only root and the region's creator may change it (publish, revoke, delete); a
/// refusal is a `denied` row for `action`.
async fn owner_allowed(
    d: &Daemon,
    requester: &Requester,
    info: &RegionInfo,
    action: &str,
) -> Result<(), ApiError> {
    if may_manage(requester, info) {
        return Ok(());
    }
    let why = format!(
        "region {} belongs to uid {}; only it and root may change it",
        info.name, info.owner_uid
    );
    deny(d, requester, action, Some(&info.name), "region owner", &why).await;
    Err(ApiError::forbidden(why))
}

/// The authority of a change `owner_allowed` let through, as its row says it.
fn manage_authority(requester: &Requester, name: &str) -> String {
    format!(
        "{} may manage region {name} ({})",
        who(requester),
        owner_rule(requester)
    )
}
