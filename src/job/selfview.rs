//! A job's own state as files (/run/agentd/self): what they say, and writing them. The
//! daemon (`daemon::selfview`) and `agentd run` (`RunView`) gather the facts their own
//! way and share this: the same files, the same format, the same atomic writes.
//!
//! One small plain-text file per fact, plus `json` with all of them: identity, state,
//! limits, usage with headroom, pressure, scheduling, lease, grants, denials.

use crate::cgroup::Usage;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// What the view says about the job besides its start report and its usage.
pub struct Facts<'a> {
    pub job_id: &'a str,
    pub agent: &'a str,
    pub model: &'a str,
    pub policy: &'a str,
    pub policy_sha256: &'a str,
    /// "running", "frozen".
    pub state: String,
    /// The lease and its expiry; None for a durable job or `agentd run`.
    pub lease: Option<(String, Option<u64>)>,
    /// The job's cgroup directories (pressure is read there).
    pub cgroup_dirs: &'a [String],
    /// What the job holds of each object class the daemon charges it, with the quota
    /// (`objects/CLASS`); None for `agentd run` (there is no daemon to hold anything).
    pub objects: Option<Value>,
    /// Refusals other than the network's (quotas), in the denials' shape.
    pub refusals: Vec<Value>,
}

/// The parts of a job report the view shows, as one small document: kept per running
/// job, so only these (the whole report is ten times larger).
pub fn compact_start_report(full: &Value) -> String {
    let e = &full["enforced"];
    json!({
        "limits": full["limits"],
        "network": full["network"],
        "sched": full["sched"],
        "enforced": {
            "filesystem": e["filesystem"],
            "landlock": {"tcp_bind": e["landlock"]["tcp_bind"],
                "tcp_connect": e["landlock"]["tcp_connect"]},
            "cgroup": {"limits_applied": e["cgroup"]["limits_applied"]},
        },
    })
    .to_string()
}

fn or_none<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

/// Every file of the view: relative path → content. `start_report`: the compact start
/// report; `network`: the report's network section as of now (denials included).
pub fn render(
    f: &Facts<'_>,
    start_report: &Value,
    usage: Usage,
    network: &Value,
) -> BTreeMap<String, String> {
    let limits = &start_report["limits"];
    let memory_limit = limits["memory"].as_u64();
    let pids_limit = limits["pids"].as_u64();
    // The CPU bandwidth the job's cgroup carries: "QUOTA PERIOD" in µs, or "max".
    let applied = &start_report["enforced"]["cgroup"]["limits_applied"];
    let cpu_max = match (
        applied["cpu.max"].as_str(),
        applied["cpu.cfs_quota_us"].as_str(),
        applied["cpu.cfs_period_us"].as_str(),
    ) {
        (Some(max), _, _) => max.to_owned(),
        (None, Some(q), Some(p)) => format!("{q} {p}"),
        _ => "max".to_owned(),
    };
    let pressure = |what: &str| -> String {
        // Pressure files are cgroup v2's: on a hybrid host the unified directory, which
        // comes last, is the one that has them.
        for dir in f.cgroup_dirs.iter().rev() {
            if let Ok(text) =
                std::fs::read_to_string(Path::new(dir).join(format!("{what}.pressure")))
            {
                return text;
            }
        }
        "unavailable: the kernel reports pressure per cgroup on cgroup v2 only\n".into()
    };
    let mut denials: Vec<Value> = network["denials"].as_array().cloned().unwrap_or_default();
    denials.extend(f.refusals.iter().cloned());
    let denial_lines: String = denials
        .iter()
        .map(|d| {
            format!(
                "{} {}: {} [{}]\n",
                d["protocol"].as_str().unwrap_or(""),
                d["destination"].as_str().unwrap_or(""),
                d["reason"].as_str().unwrap_or(""),
                d["rule"].as_str().unwrap_or("")
            )
        })
        .collect();
    let grants_fs: String = start_report["enforced"]["filesystem"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|g| {
                    format!(
                        "{} {} {}\n",
                        g["access"].as_str().unwrap_or(""),
                        g["path"].as_str().unwrap_or(""),
                        g["rule"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // The class and its parameters as the job's report has them ("fair" with the
    // kernel's defaults for a report from before classes).
    let mut sched = match &start_report["sched"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({"class": "fair"}),
    };
    sched["cpu_max"] = json!(cpu_max);
    let u = usage;
    let headroom = |limit: Option<u64>, used: Option<u64>| match (limit, used) {
        (Some(l), Some(u)) => Some(l.saturating_sub(u)),
        _ => None,
    };

    let all = json!({
        "identity": {"job_id": f.job_id, "agent": f.agent, "model": f.model,
            "policy": f.policy, "policy_sha256": f.policy_sha256},
        "state": f.state,
        "limits": limits,
        "usage": {
            "cpu_usec": u.cpu_usec, "memory_bytes": u.memory_bytes,
            "memory_headroom_bytes": headroom(memory_limit, u.memory_bytes),
            "peak_memory_bytes": u.peak_memory_bytes, "pids": u.pids,
            "pids_headroom": headroom(pids_limit, u.pids),
            "oom_kills": u.oom_kills, "throttled_usec": u.throttled_usec,
            "throttled_periods": u.throttled_periods,
        },
        "pressure": {"cpu": pressure("cpu"), "memory": pressure("memory"), "io": pressure("io")},
        "sched": sched,
        "lease": f.lease.as_ref().map(|(l, e)| json!({"id": l, "expires_ms": e})),
        "grants": {"filesystem": start_report["enforced"]["filesystem"], "network": {
            "mode": network["mode"], "allow_domains": network["allow_domains"],
            "allow_private": network["allow_private"],
            "tcp_bind": start_report["enforced"]["landlock"]["tcp_bind"],
            "tcp_connect": start_report["enforced"]["landlock"]["tcp_connect"]}},
        "denials": denials,
        "denied_total": network["denied"].as_u64().unwrap_or(0) + f.refusals.len() as u64,
        "objects": f.objects,
    });

    let text = |v: &Value| match v {
        Value::Null => "none".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut files = BTreeMap::new();
    let mut put = |name: &str, content: String| {
        // One line per fact, newline-terminated; an empty list is an empty file.
        let content = if content.is_empty() || content.ends_with('\n') {
            content
        } else {
            content + "\n"
        };
        files.insert(name.to_owned(), content);
    };
    for key in ["job_id", "agent", "model", "policy", "policy_sha256"] {
        put(&format!("identity/{key}"), text(&all["identity"][key]));
    }
    put("state", text(&all["state"]));
    for key in ["cpu", "memory", "pids", "timeout"] {
        put(&format!("limits/{key}"), text(&limits[key]));
    }
    for (key, v) in all["usage"].as_object().expect("an object") {
        put(&format!("usage/{key}"), text(v));
    }
    for key in ["cpu", "memory", "io"] {
        put(&format!("pressure/{key}"), text(&all["pressure"][key]));
    }
    put("sched/class", text(&sched["class"]));
    put("sched/cpu_max", cpu_max.clone());
    let params: String = sched
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "class" | "cgroup" | "cpu_max"))
                .map(|(k, v)| format!("{k} {}\n", text(v)))
                .collect()
        })
        .unwrap_or_default();
    put("sched/params", params);
    put(
        "lease/id",
        or_none(f.lease.as_ref().map(|(l, _)| l.clone())),
    );
    put(
        "lease/expires_ms",
        or_none(f.lease.as_ref().and_then(|(_, e)| *e)),
    );
    put("grants/filesystem", grants_fs);
    put(
        "grants/network",
        format!(
            "mode {}\nallow_domains {}\nallow_private {}\n",
            text(&network["mode"]),
            network["allow_domains"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            text(&network["allow_private"])
        ),
    );
    put("denials", denial_lines);
    if let Some(Value::Object(classes)) = &f.objects {
        for (class, held) in classes {
            put(
                &format!("objects/{class}"),
                format!(
                    "live {}\nbytes {}\nquota_objects {}\nquota_bytes {}\n",
                    text(&held["live"]),
                    text(&held["bytes"]),
                    text(&held["quota_objects"]),
                    text(&held["quota_bytes"])
                ),
            );
        }
    }
    put("json", format!("{all:#}"));
    files
}

/// Writes the files whose content changed since the last call, each atomically.
#[derive(Default)]
pub struct Writer {
    /// A hash of each file's content as last written, in the (fixed) order of the files.
    written: Vec<u64>,
    /// Directories of the view this writer made (or found) already: a first write is
    /// some thirty files, and asking for each one's directories again costs a failing
    /// mkdir apiece.
    made: std::collections::HashSet<std::path::PathBuf>,
}

impl Writer {
    pub fn write_changed(
        &mut self,
        dir: &Path,
        files: &BTreeMap<String, String>,
    ) -> std::io::Result<()> {
        self.write_changed_until(dir, files, &|| false)
    }

    /// As `write_changed`, stopping between two files once `stop` says so (the job has
    /// ended: nobody will read the rest, and whoever waits for the writer need not).
    pub fn write_changed_until(
        &mut self,
        dir: &Path,
        files: &BTreeMap<String, String>,
        stop: &dyn Fn() -> bool,
    ) -> std::io::Result<()> {
        if self.written.len() != files.len() {
            self.written = vec![0; files.len()];
        }
        for (i, (name, content)) in files.iter().enumerate() {
            let h = hash(content);
            if self.written[i] == h {
                continue;
            }
            if stop() {
                break;
            }
            let parent = dir.join(name).parent().map(Path::to_path_buf);
            if let Some(parent) = parent.filter(|p| !self.made.contains(p)) {
                make_dirs(dir, &parent)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: {e}")))?;
                self.made.insert(parent);
            }
            write_file_atomic(&dir.join(name), content)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: {e}")))?;
            self.written[i] = h;
        }
        Ok(())
    }
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Writes `dir/name` atomically. `dir` (the view) and the directories in `name` are
/// made as needed, but never the job's own directory above them: a job that ended
/// meanwhile took it away, and it must not come back.
pub fn write_atomic(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    let path = dir.join(name);
    make_dirs(dir, path.parent().expect("a file below the view"))?;
    write_file_atomic(&path, content)
}

/// `dir` and the directories from it down to `parent` (which is below it), as needed.
fn make_dirs(dir: &Path, parent: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut made = dir.to_path_buf();
    let below = parent.strip_prefix(dir).unwrap_or(Path::new(""));
    for part in std::iter::once(std::ffi::OsStr::new("")).chain(below.iter()) {
        if !part.is_empty() {
            made.push(part);
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&made) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file beside it and a rename; 0644 whatever the
/// umask (the job's user reads it), set on the open file.
fn write_file_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Where `agentd run` jobs see their view.
pub const VIEW_MOUNT: &str = "/run/agentd/self";

/// `agentd run`: the directory of a job's view, `RUNTIME_DIR/views/ID/self`, bound
/// read-only at /run/agentd/self; removed on drop (a run that died leaves it to the next
/// run's sweep, see `stale`). Outside the job's runtime directory, which only root
/// may enter: the job's setup binds it as the job's user.
pub struct ViewDir {
    root: std::path::PathBuf,
}

impl ViewDir {
    pub fn create(runtime_dir: &Path, id: &str) -> std::io::Result<ViewDir> {
        use std::os::unix::fs::DirBuilderExt;
        crate::job::make_passable(runtime_dir)?;
        let views = runtime_dir.join("views");
        match std::fs::DirBuilder::new().mode(0o711).create(&views) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let root = views.join(id);
        std::fs::DirBuilder::new().mode(0o711).create(&root)?;
        let dir = ViewDir { root };
        std::fs::DirBuilder::new().mode(0o755).create(dir.path())?;
        Ok(dir)
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.root.join("self")
    }
}

impl Drop for ViewDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The facts of an `agentd run` job, owned by its writer thread.
pub struct RunFacts {
    pub job_id: String,
    pub agent: String,
    pub model: String,
    pub policy: String,
    pub policy_sha256: String,
    pub cgroup_dirs: Vec<String>,
}

/// Wakes `agentd run`'s view writer: at once for a denial, or to stop.
#[derive(Clone, Default)]
pub struct Wake(std::sync::Arc<(std::sync::Mutex<u8>, std::sync::Condvar)>);

const IDLE: u8 = 0;
const REFRESH_NOW: u8 = 1;
const STOP: u8 = 2;

impl Wake {
    pub fn refresh(&self) {
        self.set(REFRESH_NOW);
    }

    fn set(&self, what: u8) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().expect("view wake lock");
        *s = (*s).max(what);
        cv.notify_one();
    }

    /// Asked to stop (the job has ended)?
    fn stopping(&self) -> bool {
        *self.0.0.lock().expect("view wake lock") == STOP
    }

    /// Waits up to `timeout` for a request; true when asked to stop.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let (state, cv) = &*self.0;
        let s = state.lock().expect("view wake lock");
        let (mut s, _) = cv
            .wait_timeout_while(s, timeout, |s| *s == IDLE)
            .expect("view wake lock");
        let stop = *s == STOP;
        *s = IDLE;
        stop
    }
}

/// `agentd run`'s view writer: a thread that rewrites the view once a second (and when
/// woken) while the job runs.
pub struct RunView {
    wake: Wake,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunView {
    pub fn start(
        dir: std::path::PathBuf,
        facts: RunFacts,
        compact_start_report: String,
        cgroup: Box<dyn crate::cgroup::JobCgroup>,
        membrane: Option<std::sync::Arc<crate::net::Membrane>>,
        wake: Wake,
    ) -> std::io::Result<RunView> {
        let start_report: Value =
            serde_json::from_str(&compact_start_report).unwrap_or(Value::Null);
        let w = wake.clone();
        let thread = std::thread::Builder::new()
            .name("agentd-view".into())
            .spawn(move || {
                let mut writer = Writer::default();
                loop {
                    let network = membrane
                        .as_ref()
                        .map(|m| serde_json::to_value(m.report()).unwrap_or_default())
                        .unwrap_or_else(|| start_report["network"].clone());
                    let f = Facts {
                        job_id: &facts.job_id,
                        agent: &facts.agent,
                        model: &facts.model,
                        policy: &facts.policy,
                        policy_sha256: &facts.policy_sha256,
                        state: "running".into(),
                        lease: None,
                        cgroup_dirs: &facts.cgroup_dirs,
                        objects: None,
                        refusals: Vec::new(),
                    };
                    let files = render(&f, &start_report, cgroup.usage(), &network);
                    let stop = || w.stopping();
                    if let Err(e) = writer.write_changed_until(&dir, &files, &stop) {
                        super::say(&format!(
                            "agentd: job {}: cannot write its view: {e}",
                            facts.job_id
                        ));
                    }
                    if w.wait(std::time::Duration::from_secs(1)) {
                        break;
                    }
                }
            })?;
        Ok(RunView {
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for RunView {
    fn drop(&mut self) {
        self.wake.set(STOP);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_say_each_fact_once_and_json_all() {
        let full = json!({
            "limits": {"cpu": 0.5, "memory": 1000, "pids": 10, "timeout": null},
            "network": {"mode": "proxy", "allow_domains": ["a.example"], "allow_private": false},
            "enforced": {
                "filesystem": [{"path": "/usr", "access": "exec", "rule": "p:filesystem.exec[0]"}],
                "landlock": {"tcp_bind": [], "tcp_connect": [3128, 1080]},
                "cgroup": {"limits_applied": {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"}},
                "seccomp": {"big": "not kept"},
            },
        });
        let compact: Value = serde_json::from_str(&compact_start_report(&full)).unwrap();
        assert!(
            compact["enforced"].get("seccomp").is_none(),
            "only what the view shows"
        );
        let facts = Facts {
            job_id: "0123456789ab",
            agent: "a",
            model: "m",
            policy: "p",
            policy_sha256: "00",
            state: "running".into(),
            lease: Some(("l1".into(), Some(42))),
            cgroup_dirs: &[],
            objects: None,
            refusals: Vec::new(),
        };
        let usage = Usage {
            memory_bytes: Some(400),
            pids: Some(3),
            ..Default::default()
        };
        let network = json!({"mode": "proxy", "allow_domains": ["a.example"], "allow_private": false,
            "denied": 1, "denials": [{"protocol": "http", "destination": "b.example:80",
            "reason": "no pattern", "rule": "p:network.allow_domains"}]});
        let files = render(&facts, &compact, usage, &network);
        assert_eq!(files["identity/job_id"], "0123456789ab\n");
        assert_eq!(files["limits/memory"], "1000\n");
        assert_eq!(files["limits/timeout"], "none\n");
        assert_eq!(files["usage/memory_headroom_bytes"], "600\n");
        assert_eq!(files["usage/pids_headroom"], "7\n");
        assert_eq!(files["sched/cpu_max"], "50000 100000\n");
        assert_eq!(files["lease/expires_ms"], "42\n");
        assert_eq!(
            files["denials"],
            "http b.example:80: no pattern [p:network.allow_domains]\n"
        );
        assert!(files["grants/filesystem"].contains("exec /usr p:filesystem.exec[0]"));
        let all: Value = serde_json::from_str(&files["json"]).unwrap();
        assert_eq!(all["usage"]["memory_bytes"], 400);
        assert_eq!(all["denials"][0]["destination"], "b.example:80");
    }
}
