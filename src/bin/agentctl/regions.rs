//! `agentctl region ...`: regions on the host side (POST/GET /v1/regions...).

use crate::output::table;
use crate::{Fail, emit, emit_json};
use agentd::api::client::{Client, encode};
use agentd::api::types::{RegionCreateRequest, RegionDeleted, RegionView};
use std::path::PathBuf;

fn bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, size) in UNITS {
        if n >= size {
            return format!("{:.1}{u}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

fn base(v: &RegionView) -> String {
    use agentd::region::Base;
    let b = match &v.info.base {
        Base::File { path } => format!("file {path}"),
        Base::Chunks { manifest } => format!("chunks {}", &manifest[..12.min(manifest.len())]),
        Base::Zero => "zero".into(),
    };
    match &v.info.parent {
        Some(p) if v.info.base_inherited => format!("{b} (clone of {p})"),
        _ => b,
    }
}

pub async fn create(
    client: &Client,
    name: String,
    from_file: Option<PathBuf>,
    zero: Option<String>,
    clone: Option<String>,
    json: bool,
) -> Result<i32, Fail> {
    let from_file = match from_file {
        Some(p) => Some(
            std::path::absolute(&p)
                .map_err(|e| Fail(format!("{}: {e}", p.display())))?
                .into_os_string()
                .into_string()
                .map_err(|p| Fail(format!("{}: not UTF-8", p.display())))?,
        ),
        None => None,
    };
    if from_file.is_none() && zero.is_none() && clone.is_none() {
        return Err(Fail(
            "region create needs a source: --from-file FILE, --zero SIZE or --clone PARENT".into(),
        ));
    }
    let req = RegionCreateRequest {
        name,
        from_file,
        zero,
        clone,
    };
    let v: RegionView = client.post("/v1/regions", &req).await?;
    if json {
        emit_json(&v)?;
    } else {
        emit(&format!(
            "{} {} generation {} ({})\n",
            v.info.name,
            bytes(v.info.size),
            v.info.generation,
            base(&v)
        ))?;
    }
    Ok(0)
}

/// `publish` or `revoke`.
pub async fn change(client: &Client, name: &str, what: &str, json: bool) -> Result<i32, Fail> {
    let v: RegionView = client
        .post_empty(&format!("/v1/regions/{}/{what}", encode(name)))
        .await?;
    if json {
        emit_json(&v)?;
    } else {
        emit(&format!(
            "{} {:?} generation {} ({}); {} handle(s) open\n",
            v.info.name,
            v.info.state,
            v.info.generation,
            base(&v),
            v.handles
        ))?;
    }
    Ok(0)
}

pub async fn delete(client: &Client, name: &str, json: bool) -> Result<i32, Fail> {
    let v: RegionDeleted = client
        .delete(&format!("/v1/regions/{}", encode(name)))
        .await?;
    if json {
        emit_json(&v)?;
    } else {
        let f = &v.freed;
        emit(&format!(
            "{} deleted (generation {}); freed {} chunk(s), {} manifest(s), {} layer file(s): {}\n",
            v.region.name,
            v.region.generation,
            f.chunks,
            f.manifests,
            f.layers,
            bytes(f.bytes)
        ))?;
    }
    Ok(0)
}

fn job_query(job: Option<&str>) -> String {
    job.map(|j| format!("?job={}", encode(j)))
        .unwrap_or_default()
}

pub async fn inspect(
    client: &Client,
    name: &str,
    job: Option<&str>,
    json: bool,
) -> Result<i32, Fail> {
    let v: RegionView = client
        .get(&format!("/v1/regions/{}{}", encode(name), job_query(job)))
        .await?;
    if json {
        emit_json(&v)?;
        return Ok(0);
    }
    let s = &v.stats;
    let mut out = format!(
        "name:        {}\nsize:        {} ({} bytes)\ngeneration:  {}\nstate:       {:?}\nbase:        {}\nlayer pages: {}\nowner uid:   {}\nhandles:     {} open, {} opened{}\n",
        v.info.name,
        bytes(v.info.size),
        v.info.size,
        v.info.generation,
        v.info.state,
        base(&v),
        v.info.layer_pages,
        v.info.owner_uid,
        v.handles,
        s.opens,
        job.map(|j| format!(" (counters of job {j})"))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "faults:      {}\nfetched:     {}\nzero-filled: {}\ncopied (cow): {}\nread-ahead:  {} pages filled, {} read without a fault\nlatency:     p50 <= {} us, p99 <= {} us\n",
        s.faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        bytes(s.bytes_fetched),
        bytes(s.bytes_zeroed),
        bytes(s.bytes_cow),
        s.readahead_pages,
        s.readahead_hits,
        s.latency_quantile_us(0.5).unwrap_or_else(|| "-".into()),
        s.latency_quantile_us(0.99).unwrap_or_else(|| "-".into()),
    ));
    for f in &v.failures {
        out.push_str(&format!(
            "failure:     job {} offset {}: {}\n",
            f.job, f.offset, f.reason
        ));
    }
    emit(&out)?;
    Ok(0)
}

pub async fn ls(client: &Client, job: Option<&str>, json: bool) -> Result<i32, Fail> {
    let all: Vec<RegionView> = client
        .get(&format!("/v1/regions{}", job_query(job)))
        .await?;
    if json {
        emit_json(&all)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|v| {
            vec![
                v.info.name.clone(),
                bytes(v.info.size),
                v.info.generation.to_string(),
                format!("{:?}", v.info.state).to_lowercase(),
                base(v),
                v.handles.to_string(),
                v.stats.faults_total().to_string(),
                bytes(v.stats.bytes_fetched + v.stats.bytes_cow),
            ]
        })
        .collect();
    emit(&table(
        &[
            "NAME", "SIZE", "GEN", "STATE", "BASE", "HANDLES", "FAULTS", "FETCHED",
        ],
        &rows,
    ))?;
    Ok(0)
}
