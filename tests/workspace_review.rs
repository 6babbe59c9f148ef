//! Review workspaces (`agentctl run --review`): a unique overlay handle on a directory
//! whose change waits for `agentctl diff`, `accept` or `reject`; and the read-only,
//! borrowed view (`--workspace DIR:ro`). Real overlays on the real kernel, a real
//! daemon (see `common::daemon`).

mod common;

use common::daemon::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The unprivileged owner of the test workspaces (the job runs as its owner).
const OWNER: u32 = 1000;

/// Everything below `root`: relative path → (type, mode, content or link target).
fn tree(root: &Path) -> BTreeMap<String, (String, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let key = r.display().to_string();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(
                    key,
                    ("symlink".into(), 0, t.into_os_string().into_encoded_bytes()),
                );
            } else if m.is_dir() {
                out.insert(key, ("dir".into(), m.mode() & 0o7777, Vec::new()));
                stack.push(r);
            } else {
                out.insert(
                    key,
                    ("file".into(), m.mode() & 0o7777, std::fs::read(&p).unwrap()),
                );
            }
        }
    }
    out
}

/// A source directory owned by OWNER with a few files, a subdirectory and a large
/// binary file.
fn make_source(d: &TestDaemon, name: &str) -> PathBuf {
    let src = d.path(name);
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("edit.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(src.join("gone.txt"), "to be deleted\n").unwrap();
    std::fs::write(src.join("sub/moved.txt"), "moved content\n").unwrap();
    std::fs::write(src.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    chown_tree(&src);
    // Accept refuses a change to a source changed from 20 ms before the job's
    // submission on (ctime is kept at a coarse clock): let that window pass.
    std::thread::sleep(std::time::Duration::from_millis(50));
    src
}

fn chown_tree(root: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{OWNER}:{OWNER}")])
        .arg(root)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs a review job to its end; returns its id.
fn review_job(d: &TestDaemon, src: &Path, script: &str) -> String {
    let o = d.ctl(&[
        "run",
        "--review",
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let jobs = d.jobs();
    let last = jobs.last().expect("a job");
    str_of(last, "id").to_owned()
}

fn diff(d: &TestDaemon, id: &str) -> Value {
    let r = d.get(&format!("/v1/jobs/{id}/diff"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn change<'a>(diff: &'a Value, path: &str) -> &'a Value {
    diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == path)
        .unwrap_or_else(|| panic!("no change to {path} in {diff}"))
}

const EDITS: &str = "set -e
printf 'one\\nTWO\\nthree\\nfour\\n' > edit.txt
rm gone.txt
mv sub/moved.txt sub/renamed.txt
echo new > added.txt
mkdir -p newdir/deep && echo deep > newdir/deep/file.txt
chmod 755 script.sh
ln -s edit.txt alias
head -c 1048576 /dev/zero >> big.bin";

#[test]
fn review_holds_the_change_until_accept_which_applies_exactly_it() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let before = tree(&src);
    let id = review_job(&d, &src, EDITS);

    // The job ran in an overlay: the source has not changed at all.
    assert_eq!(tree(&src), before, "the source changed before accept");
    let j = d.job(&id);
    assert_eq!(j["review"]["state"], "pending", "{j}");

    let df = diff(&d, &id);
    assert_eq!(df["state"], "pending");
    let e = change(&df, "edit.txt");
    assert_eq!(e["kind"], "modified");
    let text = e["diff"].as_str().unwrap();
    assert!(
        text.contains("-two\n+TWO\n") && text.contains("+four\n"),
        "{text}"
    );
    assert_eq!(change(&df, "gone.txt")["kind"], "removed");
    let r = change(&df, "sub/renamed.txt");
    assert_eq!(
        (&r["kind"], &r["from"]),
        (&"renamed".into(), &"sub/moved.txt".into()),
        "{r}"
    );
    assert_eq!(change(&df, "added.txt")["kind"], "added");
    assert_eq!(change(&df, "newdir")["file_type"], "dir");
    assert_eq!(change(&df, "newdir/deep/file.txt")["kind"], "added");
    let s = change(&df, "script.sh");
    assert_eq!(
        (s["mode_before"].as_u64(), s["mode_after"].as_u64()),
        (Some(0o644), Some(0o755)),
        "{s}"
    );
    assert_eq!(change(&df, "alias")["target"], "edit.txt");
    let b = change(&df, "big.bin");
    assert_eq!(b["binary"], true, "{b}");
    assert_eq!(b["size"], 4 * 1024 * 1024);
    assert_eq!(df["changes"].as_array().unwrap().len(), 10, "{df}");
    // Human form too.
    let human = d.ctl_ok(&["diff", &id]);
    assert!(
        human.contains("renamed  sub/moved.txt -> sub/renamed.txt"),
        "{human}"
    );

    let o = d.ctl(&["accept", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // Exactly the change, nothing else.
    let mut want = before.clone();
    want.get_mut("edit.txt").unwrap().2 = b"one\nTWO\nthree\nfour\n".to_vec();
    want.remove("gone.txt");
    let moved = want.remove("sub/moved.txt").unwrap();
    want.insert("sub/renamed.txt".into(), moved);
    want.insert(
        "added.txt".into(),
        ("file".into(), 0o644, b"new\n".to_vec()),
    );
    want.insert("newdir".into(), ("dir".into(), 0o755, Vec::new()));
    want.insert("newdir/deep".into(), ("dir".into(), 0o755, Vec::new()));
    want.insert(
        "newdir/deep/file.txt".into(),
        ("file".into(), 0o644, b"deep\n".to_vec()),
    );
    want.get_mut("script.sh").unwrap().1 = 0o755;
    want.insert("alias".into(), ("symlink".into(), 0, b"edit.txt".to_vec()));
    want.get_mut("big.bin")
        .unwrap()
        .2
        .extend(std::iter::repeat_n(0u8, 1024 * 1024));
    let got = tree(&src);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        assert_eq!(&got[k], v, "{k} differs after accept");
    }
    // Files the change wrote belong to the source's owner.
    assert_eq!(
        std::fs::metadata(src.join("added.txt")).unwrap().uid(),
        OWNER
    );

    let j = d.job(&id);
    assert_eq!(j["review"]["state"], "accepted", "{j}");
    assert_eq!(j["review"]["decided_by"]["uid"], 0, "{j}");
    let before_dir = j["review"]["before"].as_str().unwrap().to_owned();
    // The pre-image holds what was replaced or removed.
    assert_eq!(
        std::fs::read(Path::new(&before_dir).join("gone.txt")).unwrap(),
        b"to be deleted\n"
    );
    assert_eq!(
        std::fs::read(Path::new(&before_dir).join("edit.txt")).unwrap(),
        b"one\ntwo\nthree\n"
    );
    let row = d
        .audit()
        .into_iter()
        .find(|r| r["action"] == "workspace.accept")
        .expect("an operation row for the accept");
    assert_eq!(row["target"], id.as_str());
    assert!(str_of(&row, "rollback").contains(&before_dir), "{row}");
    // Decided once.
    let r = d.post(&format!("/v1/jobs/{id}/accept"), "");
    assert!(r.error(409).contains("accepted already"));
    assert!(
        d.events()
            .iter()
            .any(|e| e["kind"] == "accepted" && e["job"] == id.as_str())
    );
}

#[test]
fn reject_discards_the_change_and_the_source_never_changed() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let before = tree(&src);
    let id = review_job(&d, &src, EDITS);
    let o = d.ctl(&["reject", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(tree(&src), before);
    assert!(
        !d.state_dir().join("workspaces").join(&id).exists(),
        "the rejected change's layers are still there"
    );
    let j = d.job(&id);
    assert_eq!(j["review"]["state"], "rejected", "{j}");
    let row = d
        .audit()
        .into_iter()
        .find(|r| r["action"] == "workspace.reject")
        .expect("an operation row for the reject");
    assert!(
        str_of(&row, "rollback").contains(src.to_str().unwrap()),
        "{row}"
    );
    let r = d.get(&format!("/v1/jobs/{id}/diff"));
    assert!(r.error(409).contains("rejected already"));
}

fn second(d: &TestDaemon, src: &Path) -> std::process::Output {
    d.ctl(&[
        "run",
        "--review",
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "true",
    ])
}

#[test]
fn a_second_unique_handle_on_a_source_is_refused_until_the_first_is_decided() {
    let mut d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let first = d.run_detached(
        &["--review", "--workspace", src.to_str().unwrap()],
        &["sh", "-c", "echo first > mine.txt; sleep 600"],
    );
    let o = second(&d, &src);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        err_text(&o).contains(&format!("unique review handle already: job {first}")),
        "{}",
        show(&o)
    );
    // Still held once the first job has ended (its change is pending), and across a
    // daemon restart.
    d.ctl_ok(&["kill", "--grace", "0s", &first]);
    d.wait_ended(&first);
    d.sigkill();
    d.launch();
    let o = second(&d, &src);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(err_text(&o).contains(&first), "{}", show(&o));
    assert!(
        d.audit().iter().any(|r| r["action"] == "job.submit"
            && str_of(r, "authority").starts_with("denied by workspace.unique")),
        "the refusal is not in the operation table"
    );
    d.ctl_ok(&["reject", &first]);
    let o = second(&d, &src);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn accept_is_refused_when_the_source_changed_under_the_job() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let id = review_job(&d, &src, "echo agent > edit.txt");
    // Someone edits the source after the job started.
    std::fs::write(src.join("gone.txt"), "a human's edit\n").unwrap();
    let o = d.ctl(&["accept", &id]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    let err = err_text(&o);
    assert!(
        err.contains("changed since the job started") && err.contains("gone.txt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(src.join("edit.txt")).unwrap(),
        b"one\ntwo\nthree\n"
    );
    assert_eq!(
        std::fs::read(src.join("gone.txt")).unwrap(),
        b"a human's edit\n"
    );
    assert_eq!(d.job(&id)["review"]["state"], "pending");
    d.ctl_ok(&["reject", &id]);
}

#[test]
fn symlinks_in_a_change_cannot_make_accept_write_outside_the_source() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let outside = d.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The job links to /etc and to a host directory and writes through the links.
    let script = format!(
        "ln -s /etc etc-link; ln -s {out} out-link; echo x > etc-link/agentd-escape; echo x > out-link/escape; true",
        out = outside.display()
    );
    let id = review_job(&d, &src, &script);
    // The links stay links; nothing was written through them, inside the job or out.
    assert!(!Path::new("/etc/agentd-escape").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A doctored upper layer: the source has a symlink to the outside directory, and
    // the upper layer a directory of that name holding a file, as if the job had
    // written through the link. (Made before the job, so the source has not "moved on".)
    d.ctl_ok(&["reject", &id]);
    std::os::unix::fs::symlink(&outside, src.join("sneaky")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let id = review_job(&d, &src, &script);
    let upper = d.state_dir().join("workspaces").join(&id).join("upper");
    std::fs::create_dir(upper.join("sneaky")).unwrap();
    std::fs::write(upper.join("sneaky/planted"), "planted\n").unwrap();
    let o = d.ctl(&["accept", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "accept wrote outside the source"
    );
    assert!(!Path::new("/etc/agentd-escape").exists());
    // The links are in the source as links; the planted file replaced the symlink
    // with a directory inside the source.
    assert!(
        std::fs::symlink_metadata(src.join("etc-link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::symlink_metadata(src.join("sneaky"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(
        std::fs::read(src.join("sneaky/planted")).unwrap(),
        b"planted\n"
    );
}

#[test]
fn review_of_a_directory_the_job_cannot_own_is_refused_with_the_reason() {
    let d = TestDaemon::start(&[]);
    let src = d.path("root-owned");
    std::fs::create_dir(&src).unwrap();
    let o = d.ctl(&[
        "run",
        "--review",
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(err_text(&o).contains("cannot be idmapped"), "{}", show(&o));
    assert!(
        !d.state_dir().join("workspaces").exists()
            || std::fs::read_dir(d.state_dir().join("workspaces"))
                .unwrap()
                .count()
                == 0
    );
}

#[test]
fn a_read_only_workspace_is_a_borrowed_view() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let before = tree(&src);
    let ro = format!("{}:ro", src.display());
    let o = d.ctl(&[
        "run",
        "--workspace",
        &ro,
        "--",
        "sh",
        "-c",
        "cat edit.txt; sh script.sh; echo x > edit.txt",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        out_text(&o).starts_with("one\ntwo\nthree\nhi\n"),
        "{}",
        show(&o)
    );
    assert!(
        err_text(&o).contains("Read-only file system"),
        "{}",
        show(&o)
    );
    assert_eq!(tree(&src), before);
}

/// overlayfs' own encodings: a directory removed and made again is opaque in the upper
/// layer (the source's entries below it are gone), and a file copied up but left as it
/// was (chmod to its own mode) is no change.
#[test]
fn a_replaced_directory_replaces_and_an_untouched_copy_up_is_no_change() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let id = review_job(
        &d,
        &src,
        "set -e; rm -rf sub; mkdir sub; echo fresh > sub/only.txt; chmod 644 edit.txt",
    );
    let upper = d.state_dir().join("workspaces").join(&id).join("upper");
    assert!(
        upper.join("edit.txt").exists(),
        "edit.txt was not copied up"
    );
    let df = diff(&d, &id);
    let paths: Vec<(String, String)> = df["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (str_of(c, "path").to_owned(), str_of(c, "kind").to_owned()))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("sub".to_owned(), "removed".to_owned()),
            ("sub".to_owned(), "added".to_owned()),
            ("sub/only.txt".to_owned(), "added".to_owned()),
        ],
        "{df}"
    );
    d.ctl_ok(&["accept", &id]);
    let names: Vec<_> = std::fs::read_dir(src.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["only.txt"]);
    assert_eq!(
        std::fs::read(src.join("edit.txt")).unwrap(),
        b"one\ntwo\nthree\n"
    );
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(dir)
        .args(args)
        .output()
        .expect("git is installed (.ci/run installs it)");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// make_source as a git repository with one commit, whose own configuration names the
/// accepting user (root, in these tests) "Rev Iewer <reviewer@example.org>".
fn git_repo(d: &TestDaemon, name: &str) -> PathBuf {
    let src = make_source(d, name);
    git(&src, &["init", "-q", "-b", "main"]);
    git(&src, &["config", "user.name", "Rev Iewer"]);
    git(&src, &["config", "user.email", "reviewer@example.org"]);
    git(&src, &["add", "-A"]);
    git(
        &src,
        &["-c", "commit.gpgsign=false", "commit", "-q", "-m", "base"],
    );
    chown_tree(&src);
    std::thread::sleep(std::time::Duration::from_millis(50));
    src
}

/// `accept --commit` in a git work tree: the commit is authored and signed off by the
/// accepting user (their git identity; here the repository's own configuration), with
/// an Assisted-by trailer for the job's agent and model and no Signed-off-by for the
/// agent; the job's edits to .git (a hook) are not applied and never run.
#[test]
fn accept_commit_records_provenance_and_never_takes_git_metadata_from_the_job() {
    let d = TestDaemon::start(&[]);
    let src = git_repo(&d, "repo");
    let marker = d.path("hook-ran");
    let script = format!(
        "set -e; echo changed >> edit.txt; echo new > new.txt; \
         printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/pre-commit; chmod +x .git/hooks/pre-commit; \
         git config --file .git/config core.fsmonitor 'touch {m}' 2>/dev/null || true",
        m = marker.display()
    );
    let o = d.ctl(&[
        "run",
        "--review",
        "--agent",
        "claude",
        "--model",
        "m-1",
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let id = str_of(d.jobs().last().unwrap(), "id").to_owned();
    // The owner looks at the repository meanwhile: `git status` rewrites .git/index,
    // which is not the work tree moving on.
    std::thread::sleep(std::time::Duration::from_millis(30));
    let st = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(&src)
        .args(["status", "--porcelain"])
        .uid(OWNER)
        .gid(OWNER)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let o = d.ctl(&["--json", "accept", "--commit", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let sha = j["review"]["commit"]
        .as_str()
        .unwrap_or_else(|| panic!("no commit: {j}"));
    assert_eq!(git(&src, &["rev-parse", "HEAD"]).trim(), sha);
    let body = git(&src, &["log", "-1", "--format=%B"]);
    assert!(body.contains("Assisted-by: claude:m-1"), "{body}");
    let signed: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("Signed-off-by:"))
        .collect();
    assert_eq!(
        signed,
        vec!["Signed-off-by: Rev Iewer <reviewer@example.org>"],
        "{body}"
    );
    assert_eq!(
        git(&src, &["log", "-1", "--format=%an <%ae>"]).trim(),
        "Rev Iewer <reviewer@example.org>"
    );
    let files = git(&src, &["show", "--name-only", "--format=", "HEAD"]);
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        vec!["edit.txt", "new.txt"],
        "{files}"
    );
    // The job's .git edits stayed in its layer: no hook, no fsmonitor, nothing ran.
    assert!(!src.join(".git/hooks/pre-commit").exists());
    assert!(!git(&src, &["config", "--list"]).contains("fsmonitor"));
    assert!(
        !marker.exists(),
        "code the job wrote ran outside its sandbox"
    );
    let skipped = j["review"]["skipped"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(skipped.iter().any(|s| s == ".git/hooks/pre-commit"), "{j}");
    // git kept its files owned by the repository's owner.
    assert_eq!(
        std::fs::metadata(src.join(".git/index")).unwrap().uid(),
        OWNER
    );
    let row = d
        .audit()
        .into_iter()
        .find(|r| r["action"] == "workspace.accept")
        .unwrap();
    assert_eq!(row["change"]["commit"], sha);
    assert_eq!(
        row["change"]["signed_off_by"],
        "Rev Iewer <reviewer@example.org>"
    );
}

/// `accept --publish`: the source with the change becomes an immutable,
/// content-addressed snapshot (the source does not change); jobs borrow it read-only;
/// removing it waits while a job holds it, and it goes when the last holder ends.
#[test]
fn a_published_snapshot_is_shared_read_only_and_removed_after_its_last_borrower() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let before = tree(&src);
    let id = review_job(
        &d,
        &src,
        "echo published > edit.txt; rm gone.txt; echo n > new.txt",
    );
    let o = d.ctl(&["accept", "--publish", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let snap = out_text(&o).trim().to_owned();
    assert_eq!(snap.len(), 64, "not a snapshot id: {snap:?}");
    assert_eq!(tree(&src), before, "publishing changed the source");
    let j = d.job(&id);
    assert_eq!(j["review"]["snapshot"], snap.as_str(), "{j}");
    assert!(
        d.audit()
            .iter()
            .any(|r| r["action"] == "workspace.publish" && str_of(r, "rollback").contains(&snap)),
        "no workspace.publish row naming the snapshot"
    );
    let info = d.get(&format!("/v1/snapshots/{snap}")).json();
    let path = PathBuf::from(str_of(&info, "path"));
    assert_eq!(
        std::fs::read(path.join("edit.txt")).unwrap(),
        b"published\n"
    );
    assert!(!path.join("gone.txt").exists());

    // A borrower sees it read-only.
    let o = d.ctl(&[
        "run",
        "--snapshot",
        &snap,
        "--",
        "sh",
        "-c",
        "cat edit.txt new.txt; echo x > edit.txt",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(out_text(&o), "published\nn\n", "{}", show(&o));
    assert!(
        err_text(&o).contains("Read-only file system"),
        "{}",
        show(&o)
    );

    // The same content published again is the same snapshot.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let id2 = review_job(
        &d,
        &src,
        "echo published > edit.txt; rm gone.txt; echo n > new.txt",
    );
    let again = d.ctl_ok(&["accept", "--publish", &id2]);
    assert_eq!(again.trim(), snap);
    assert_eq!(d.get("/v1/snapshots").json().as_array().unwrap().len(), 1);

    // Held: removal waits.
    let holder = d.run_detached(&["--snapshot", &snap], &["sleep", "600"]);
    let r = d.request("DELETE", &format!("/v1/snapshots/{snap}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["holders"], serde_json::json!([holder]));
    assert!(
        path.join("edit.txt").exists(),
        "removed while a job holds it"
    );
    // No new borrowers once it is being removed.
    let o = d.ctl(&["run", "--snapshot", &snap, "--", "true"]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(err_text(&o).contains("being removed"), "{}", show(&o));
    // The last holder ends: it goes, with its objects.
    d.ctl_ok(&["kill", "--grace", "0s", &holder]);
    d.wait_ended(&holder);
    wait_until("the snapshot is removed", LIVENESS, || !path.exists());
    let objects = d.state_dir().join("snapshots/objects");
    assert_eq!(
        std::fs::read_dir(&objects).map(|e| e.count()).unwrap_or(0),
        0,
        "objects left behind"
    );
    assert_eq!(d.get(&format!("/v1/snapshots/{snap}")).status, 404);
}

/// Speaks HTTP to the job's own socket from inside the job (python3, as an agent's
/// tooling would), printing each answer's status line.
const TOOL_CALLS_PY: &str = r#"
import json, os, socket
def call(method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["AGENTD_SOCKET"])
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: job\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    return out.split(b"\r\n")[0].decode()
print(call("POST", "/v1/self/tool-calls", {"name": "grep", "args_digest": "ab12", "status": "ok"}))
print(call("POST", "/v1/self/tool-calls", {"name": "sed", "status": "error"}))
print(call("POST", "/v1/self/tool-calls", {"name": "grep", "status": "ok"}))
print(call("POST", "/v1/self/tool-calls", {"name": "bad name!", "status": "ok"}))
print(call("GET", "/v1/jobs"))
print(call("GET", "/v1/self"))
with open("edit.txt", "a") as f:
    f.write("by the agent\n")
"#;

/// A job records its tool calls through its own socket (and can do nothing else there);
/// they are kept with the job and named in the Assisted-by trailer of the commit.
#[test]
fn a_jobs_tool_calls_come_through_its_socket_into_the_provenance() {
    let d = TestDaemon::start(&[]);
    let src = git_repo(&d, "repo");
    let o = d.ctl(&[
        "run",
        "--review",
        "--agent",
        "claude",
        "--model",
        "m-1",
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "python3",
        "-c",
        TOOL_CALLS_PY,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let text = out_text(&o);
    let statuses: Vec<&str> = text
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        vec!["201", "201", "201", "400", "404", "200"],
        "{}",
        show(&o)
    );
    let id = str_of(d.jobs().last().unwrap(), "id").to_owned();
    let j = d.job(&id);
    let calls: Vec<(String, String)> = j["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {j}"))
        .iter()
        .map(|c| (str_of(c, "name").to_owned(), str_of(c, "status").to_owned()))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("grep".to_owned(), "ok".to_owned()),
            ("sed".to_owned(), "error".to_owned()),
            ("grep".to_owned(), "ok".to_owned())
        ]
    );
    assert_eq!(j["tool_calls"][0]["args_digest"], "ab12");
    // The socket's directory goes with the job.
    assert!(!d.path("run/sockets").join(&id).exists());
    d.ctl_ok(&["accept", "--commit", &id]);
    let body = git(&src, &["log", "-1", "--format=%B"]);
    assert!(
        body.contains("Assisted-by: claude:m-1 grep sed\n"),
        "{body}"
    );
}

/// The job's socket outlives a daemon crash: the restarted daemon binds a new socket in
/// the directory the job holds, and the job's next tool call reaches it.
#[test]
fn a_jobs_socket_reaches_the_daemon_after_a_restart() {
    let mut d = TestDaemon::start(&[]);
    let ws = make_source(&d, "ws");
    let script = format!(
        "import time, os\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\n{}",
        TOOL_CALLS_PY
            .lines()
            .filter(|l| !l.starts_with("print(")
                && !l.starts_with("with ")
                && !l.starts_with("    f.write"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\nprint(call(\"POST\", \"/v1/self/tool-calls\", {\"name\": \"after-restart\", \"status\": \"ok\"}))\n"
    );
    let id = d.run_detached(
        &["--workspace", ws.to_str().unwrap()],
        &["python3", "-c", &script],
    );
    d.sigkill();
    d.launch();
    std::fs::write(ws.join("go"), "").unwrap();
    let j = d.wait_ended(&id);
    assert_eq!(j["exit"]["code"], 0, "{j}");
    let logs = d.ctl_ok(&["logs", &id]);
    assert!(logs.contains("201"), "{logs}");
    let j = d.job(&id);
    assert_eq!(j["tool_calls"][0]["name"], "after-restart", "{j}");
}

fn policy_file(d: &TestDaemon, name: &str, workspace_section: &str) -> PathBuf {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let cut = base
        .find("[workspace]")
        .expect("default.toml has a [workspace] section");
    let path = d.path(&format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("{}[workspace]\n{workspace_section}\n", &base[..cut])
            .replace("name = \"default\"", &format!("name = \"{name}\"")),
    )
    .unwrap();
    path
}

/// The policy grants workspace handles: a mode it does not list is refused, naming the
/// key; a bad value is an error at its line; `concurrent_review = "clone"` gives a
/// second review job its own overlay, and whichever change is accepted second is
/// refused because the directory moved on.
#[test]
fn the_policy_grants_handle_kinds_and_may_clone_concurrent_reviews() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let only_review = policy_file(&d, "only-review", "modes = [\"review\"]");
    let o = d.ctl(&[
        "run",
        "--policy-file",
        only_review.to_str().unwrap(),
        "--workspace",
        src.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        err_text(&o).contains("does not grant direct workspaces (workspace.modes: review)"),
        "{}",
        show(&o)
    );
    let bad = policy_file(&d, "bad", "modes = [\"everything\"]");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["run", "--policy"])
        .arg(&bad)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("workspace.modes")
            && err.contains("\"everything\"")
            && err.contains("bad.toml:"),
        "{err}"
    );

    let clone = policy_file(&d, "clone", "concurrent_review = \"clone\"");
    let run = |script: &str| {
        let o = d.ctl(&[
            "run",
            "--review",
            "--policy-file",
            clone.to_str().unwrap(),
            "--workspace",
            src.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        str_of(d.jobs().last().unwrap(), "id").to_owned()
    };
    let first = run("echo first > edit.txt");
    let second = run("echo second > new.txt");
    assert_ne!(first, second);
    d.ctl_ok(&["accept", &first]);
    let o = d.ctl(&["accept", &second]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        err_text(&o).contains("changed since the job started"),
        "{}",
        show(&o)
    );
    assert_eq!(std::fs::read(src.join("edit.txt")).unwrap(), b"first\n");
    assert!(!src.join("new.txt").exists());
}

/// A job reaches neither another job's upper layer nor its own (it sees only the merged
/// view), and the daemon's state directory is not in its root at all.
#[test]
fn a_job_cannot_reach_any_upper_layer() {
    let d = TestDaemon::start(&[]);
    let a = make_source(&d, "a");
    let first = d.run_detached(
        &["--review", "--workspace", a.to_str().unwrap()],
        &["sh", "-c", "echo secret > mine.txt; sleep 600"],
    );
    let upper = d.state_dir().join("workspaces").join(&first).join("upper");
    wait_until("the first job wrote its file", LIVENESS, || {
        upper.join("mine.txt").exists()
    });
    let b = make_source(&d, "b");
    let o = d.ctl(&[
        "run",
        "--review",
        "--workspace",
        b.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &format!(
            "cat {0}/mine.txt; ls {1}; ls {2}",
            upper.display(),
            d.state_dir().join("workspaces").display(),
            d.state_dir().display()
        ),
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!out_text(&o).contains("secret"), "{}", show(&o));
    assert_eq!(
        err_text(&o).matches("No such file or directory").count(),
        3,
        "{}",
        show(&o)
    );
    d.ctl_ok(&["kill", "--grace", "0s", &first]);
    d.wait_ended(&first);
}

/// A unique handle may also sit on a published snapshot: the snapshot never changes, so
/// several may be live at once, and accepting one publishes a new snapshot.
#[test]
fn a_unique_handle_on_a_snapshot_publishes_a_new_one() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let id = review_job(&d, &src, "echo base > edit.txt");
    let base = d.ctl_ok(&["accept", "--publish", &id]).trim().to_owned();
    let base_tree = PathBuf::from(str_of(
        &d.get(&format!("/v1/snapshots/{base}")).json(),
        "path",
    ));

    // Two live handles on the same snapshot.
    let other = d.run_detached(&["--review", "--snapshot", &base], &["sleep", "600"]);
    let o = d.ctl(&[
        "run",
        "--review",
        "--snapshot",
        &base,
        "--",
        "sh",
        "-c",
        "echo changed >> edit.txt; echo n > new.txt",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let job = str_of(d.jobs().last().unwrap(), "id").to_owned();
    assert_eq!(d.job(&job)["review"]["state"], "pending");
    let r = d.post(&format!("/v1/jobs/{job}/accept"), "{}");
    assert!(r.error(409).contains("never changes"));
    // Another snapshot that shares files with `base` is published meanwhile: linking
    // the shared objects changes their ctimes, which must not read as `base` having
    // moved on (a snapshot never does).
    let sharing = review_job(&d, &src, "echo x > other.txt");
    d.ctl_ok(&["accept", "--publish", &sharing]);
    let next = d.ctl_ok(&["accept", "--publish", &job]).trim().to_owned();
    assert_ne!(next, base);
    let next_tree = PathBuf::from(str_of(
        &d.get(&format!("/v1/snapshots/{next}")).json(),
        "path",
    ));
    assert_eq!(
        std::fs::read(next_tree.join("edit.txt")).unwrap(),
        b"base\nchanged\n"
    );
    assert_eq!(std::fs::read(next_tree.join("new.txt")).unwrap(), b"n\n");
    assert_eq!(
        std::fs::read(base_tree.join("edit.txt")).unwrap(),
        b"base\n",
        "the base snapshot changed"
    );
    assert!(!base_tree.join("new.txt").exists());
    // Unchanged files are shared between the two snapshots (one object, linked twice).
    let a = std::fs::metadata(base_tree.join("gone.txt")).unwrap();
    let b = std::fs::metadata(next_tree.join("gone.txt")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    d.ctl_ok(&["kill", "--grace", "0s", &other]);
    d.wait_ended(&other);
    d.ctl_ok(&["reject", &other]);
}

/// `rollback` returns the directory to exactly what it was before the accept (from the
/// pre-image), once; after a later edit it refuses, losing nothing.
#[test]
fn rollback_returns_the_source_to_its_pre_image() {
    let d = TestDaemon::start(&[]);
    let src = make_source(&d, "src");
    let before = tree(&src);
    let id = review_job(&d, &src, EDITS);
    d.ctl_ok(&["accept", &id]);
    assert_ne!(tree(&src), before);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let o = d.ctl(&["rollback", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let after = tree(&src);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert_eq!(&after[k], v, "{k} differs after rollback");
    }
    assert_eq!(
        std::fs::metadata(src.join("gone.txt")).unwrap().uid(),
        OWNER
    );
    assert_eq!(d.job(&id)["review"]["state"], "rolled-back");
    assert!(
        d.audit()
            .iter()
            .any(|r| r["action"] == "workspace.rollback")
    );
    let r = d.post(&format!("/v1/jobs/{id}/rollback"), "");
    assert!(r.error(409).contains("rolled back"));

    // A later edit is never thrown away by a rollback. (The rollback's own writes
    // must be more than accept's 20 ms window older than the next job.)
    std::thread::sleep(std::time::Duration::from_millis(50));
    let id = review_job(&d, &src, "echo agent > edit.txt");
    d.ctl_ok(&["accept", &id]);
    std::thread::sleep(std::time::Duration::from_millis(30));
    std::fs::write(src.join("gone.txt"), "edited after the accept\n").unwrap();
    let o = d.ctl(&["rollback", &id]);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        err_text(&o).contains("changed since the change was accepted"),
        "{}",
        show(&o)
    );
    assert_eq!(std::fs::read(src.join("edit.txt")).unwrap(), b"agent\n");
    assert_eq!(
        std::fs::read(src.join("gone.txt")).unwrap(),
        b"edited after the accept\n"
    );
}
