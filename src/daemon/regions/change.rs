//! The operator's changes to regions: create (from a file, zeros or a clone), publish
//! (the content into the chunk store, a new generation) and revoke.

use super::*;

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
            authority: manage_authority(&requester, name),
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

async fn change_allowed(
    d: &Daemon,
    requester: &Requester,
    info: &RegionInfo,
    action: &str,
) -> Result<(), ApiError> {
    owner_allowed(d, requester, info, action).await?;
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
            authority: manage_authority(&requester, name),
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
