//! DELETE /v1/regions/NAME: a region's record goes, then the store's space it alone
//! held (its layer, and the manifests and chunks no other region names: chunks are
//! shared by content, so a publish's bytes stay while another region needs them).

use super::{Regions, manage_authority, manifests_in_use, no_such_region, owner_allowed};
use crate::api::types::{EventKind, RegionDeleted};
use crate::audit::{NewOperation, Requester};
use crate::daemon::Daemon;
use crate::daemon::jobs::ApiError;
use crate::store::WriteBatch;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

pub async fn delete(
    d: &Arc<Daemon>,
    name: &str,
    requester: Requester,
) -> Result<RegionDeleted, ApiError> {
    let regions = &d.regions;
    let _one = regions.changing.lock().await;
    let info = regions.info(name).ok_or_else(|| no_such_region(name))?;
    owner_allowed(d, &requester, &info, "region.delete").await?;
    let live = regions.live(name).expect("a region has its live state");
    // 1: a job reading it would lose its pages midway: refuse while handles are open.
    let open = live.handles.load(SeqCst);
    if open > 0 {
        return Err(ApiError::conflict(format!(
            "region {name} has {open} open handle(s) (agentctl region inspect {name} names their jobs): \
             revoke it first, so they fail at their next fault, and delete it once they have closed"
        )));
    }
    // 2: a sweep is owed from here on: if the daemon dies after the record, the next
    // one takes the space back when it starts.
    regions
        .files
        .mark_sweep()
        .map_err(|e| ApiError::internal(format!("cannot delete region {name}: {e}")))?;
    // A handle opened between the check above and the record fails at its first fault;
    // once the record is gone from the registry (4) no open is allowed at all.
    live.deleted.store(true, SeqCst);
    // 3: the record goes, with the row that says so, in one transaction.
    let batch = WriteBatch {
        regions_deleted: vec![name.to_owned()],
        ops: vec![NewOperation {
            requester: requester.clone(),
            action: "region.delete".into(),
            target: Some(name.to_owned()),
            authority: manage_authority(&requester, name),
            change: serde_json::json!({"region": name, "generation": info.generation,
                "state": info.state, "size": info.size, "base": info.base,
                "layer_pages": info.layer_pages}),
            rollback: "none: its own pages and the chunks no other region names are removed; \
                       create it again from its source"
                .into(),
        }],
        ..Default::default()
    };
    if let Err(e) = d.commit(batch).await {
        live.deleted.store(false, SeqCst);
        return Err(ApiError::internal(format!(
            "cannot record the delete of region {name}: {e}"
        )));
    }
    // 4: gone from the registry: opens are refused ("no region").
    regions.forget(name);
    // 5: the store's space. A failure leaves garbage, not a broken region, and the mark:
    // the daemon sweeps again when it starts.
    let (in_use, names) = regions.in_use();
    let files = regions.files.clone();
    let freed = match tokio::task::spawn_blocking(move || files.sweep(&in_use, &names)).await {
        Ok(Ok(swept)) => swept,
        Ok(Err(e)) => {
            tracing::warn!("region {name} deleted; its store space not taken back yet: {e}");
            Default::default()
        }
        Err(e) => {
            tracing::warn!("region {name} deleted; sweeping the store failed: {e}");
            Default::default()
        }
    };
    d.events.emit(
        EventKind::Region,
        None,
        None,
        format!(
            "deleted {name} (freed {} chunk(s), {} manifest(s), {} layer file(s), {} bytes)",
            freed.chunks, freed.manifests, freed.layers, freed.bytes
        ),
    );
    Ok(RegionDeleted {
        region: info,
        freed,
    })
}

impl Regions {
    /// A deleted region leaves the registry (its live state stays with any handle that
    /// still holds it).
    fn forget(&self, name: &str) {
        self.infos.lock().expect("regions lock").remove(name);
        self.live.lock().expect("regions lock").remove(name);
        self.failures.lock().expect("regions lock").remove(name);
    }

    /// The manifests the regions name, and the regions' names: what a sweep keeps.
    fn in_use(
        &self,
    ) -> (
        std::collections::HashSet<String>,
        std::collections::HashSet<String>,
    ) {
        let infos = self.infos.lock().expect("regions lock");
        (
            manifests_in_use(infos.values()),
            infos.keys().cloned().collect(),
        )
    }
}
