//! Provenance for an accepted change in a git work tree: a commit whose author is the
//! accepting user, with an `Assisted-by: AGENT:MODEL` trailer for the job and a
//! `Signed-off-by:` for that user only (never for the agent).
//!
//! git runs as the repository's owner (so its files keep their owner), with hooks and
//! fsmonitor turned off: a change is the agent's work, and nothing it wrote may run
//! outside its sandbox. The accepting user's name and e-mail come from their git
//! configuration (system, their ~/.gitconfig, the repository's), read as that user.

use std::path::Path;
use std::process::Command;

/// A person as git names them.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub email: String,
}

impl Identity {
    pub fn line(&self) -> String {
        format!("{} <{}>", self.name, self.email)
    }
}

/// Options that keep anything in the repository from running code as us.
const SAFE: &[&str] = &[
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "safe.directory=*",
];

fn git_as(uid: u32, gid: u32, home: &Path, dir: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("git");
    c.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .env("GIT_TERMINAL_PROMPT", "0")
        // (std drops root's supplementary groups when it sets a uid)
        .uid(uid)
        .gid(gid)
        .args(SAFE)
        .arg("-C")
        .arg(dir);
    c
}

fn home_of(uid: u32) -> std::path::PathBuf {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| "/nonexistent".into())
}

fn run(mut c: Command, what: &str) -> Result<String, String> {
    let out = c
        .output()
        .map_err(|e| format!("cannot run git ({what}): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether `dir` is inside a git work tree (asked as its owner).
pub fn is_work_tree(dir: &Path, owner: (u32, u32)) -> bool {
    let mut c = git_as(owner.0, owner.1, &home_of(owner.0), dir);
    c.args(["rev-parse", "--is-inside-work-tree"]);
    run(c, "rev-parse").is_ok_and(|s| s == "true")
}

/// The accepting user's git identity, from the configuration they would use in `dir`.
pub fn identity_of(uid: u32, gid: u32, dir: &Path) -> Result<Identity, String> {
    let get = |key: &str| -> Result<String, String> {
        let mut c = git_as(uid, gid, &home_of(uid), dir);
        c.args(["config", "--get", key]);
        run(c, &format!("config {key}")).and_then(|v| {
            if v.is_empty() {
                Err(format!("{key} is empty"))
            } else {
                Ok(v)
            }
        })
    };
    match (get("user.name"), get("user.email")) {
        (Ok(name), Ok(email)) => Ok(Identity { name, email }),
        _ => Err(format!(
            "uid {uid} has no git identity for {}: set user.name and user.email (git config --global, or in the repository) so the commit can carry their Signed-off-by",
            dir.display()
        )),
    }
}

/// Commits `paths` (relative to `dir`, as the change left them) as `owner`, authored
/// and signed off by `human`, with `assisted_by` as the Assisted-by trailer. Returns
/// the commit id.
pub fn commit(
    dir: &Path,
    owner: (u32, u32),
    paths: &[String],
    message: &str,
    assisted_by: &str,
    human: &Identity,
) -> Result<String, String> {
    let home = home_of(owner.0);
    let mut add = git_as(owner.0, owner.1, &home, dir);
    add.args(["add", "-A", "--"]).args(paths);
    run(add, "add")?;
    let mut c = git_as(owner.0, owner.1, &home, dir);
    c.env("GIT_AUTHOR_NAME", &human.name)
        .env("GIT_AUTHOR_EMAIL", &human.email)
        .env("GIT_COMMITTER_NAME", &human.name)
        .env("GIT_COMMITTER_EMAIL", &human.email)
        .args(["commit", "--quiet", "--no-verify", "-m", message])
        .arg("--trailer")
        .arg(format!("Assisted-by: {assisted_by}"))
        .arg("--trailer")
        .arg(format!("Signed-off-by: {}", human.line()))
        .arg("--")
        .args(paths);
    run(c, "commit")?;
    let mut head = git_as(owner.0, owner.1, &home, dir);
    head.args(["rev-parse", "HEAD"]);
    run(head, "rev-parse HEAD")
}
