//! Functional: what a coding agent needs works inside the sandbox.

mod common;
use common::*;

#[test]
fn build_and_run_a_c_program_in_the_workspace() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    std::fs::write(
        ws.join("hello.c"),
        "#include <stdio.h>\nint main(void){puts(\"hello from cc\");return 0;}\n",
    )
    .unwrap();
    let out = env.sh(
        &[
            "--workspace",
            ws.to_str().unwrap(),
            "--policy",
            "ci-coding-agent",
        ],
        "cc -O1 -o hello hello.c && ./hello",
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), "hello from cc\n");
    // The build output belongs to the workspace's owner on the host (root here, via the
    // idmapped mount), not to the job's unprivileged host user.
    let meta = std::fs::metadata(ws.join("hello")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
}

#[test]
fn workspace_owned_by_a_user_runs_as_that_user() {
    let env = Env::new();
    let ws = env.workspace("ws", Some((1000, 1000)));
    let report_path = env.path("r.json");
    let out = env.sh(
        &[
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
        ],
        "id -u; pwd; echo data > out.txt",
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("1000\n{}\n", ws.display()));
    let meta = std::fs::metadata(ws.join("out.txt")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
    let r = report(&report_path);
    assert_eq!(r["enforced"]["user"]["host_uid"], 1000);
    assert_eq!(r["enforced"]["user"]["workspace_idmapped"], false);
}

#[test]
fn threads_pipes_shell_script_and_python() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    std::fs::write(
        ws.join("script.sh"),
        "#!/bin/sh\nprintf 'one\\ntwo\\nthree\\n' | grep t | tr a-z A-Z | sort\n",
    )
    .unwrap();
    std::fs::set_permissions(
        ws.join("script.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = env.sh(&["--workspace", ws.to_str().unwrap()], "./script.sh");
    assert_ok(&out);
    assert_eq!(stdout(&out), "THREE\nTWO\n");

    let py = "import threading, os\nr=[]\nts=[threading.Thread(target=lambda i=i: r.append(i*i)) for i in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nrd, wr = os.pipe()\nos.write(wr, b'piped')\nprint(sorted(r), os.read(rd, 5).decode())";
    let out = env.agentd(&["run", "--", "python3", "-c", py]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "[0, 1, 4, 9, 16, 25, 36, 49] piped\n");
}

#[test]
fn environment_is_built_from_policy_and_flags() {
    let env = Env::new();
    let out = env.agentd_with_env(
        &["run", "--env", "FOO=bar", "--env", "PASSME", "--", "env"],
        &[("PASSME", "yes"), ("SECRET_TOKEN", "leak")],
    );
    assert_ok(&out);
    let s = stdout(&out);
    assert!(
        s.contains("FOO=bar\n")
            && s.contains("PASSME=yes\n")
            && s.contains("HOME=/tmp\n")
            && s.contains("PATH=/usr/local/bin"),
        "{s}"
    );
    assert!(
        !s.contains("SECRET_TOKEN"),
        "agentd's environment leaked into the job: {s}"
    );
}

#[test]
fn hostname_dev_and_tmp_are_the_jobs_own() {
    let env = Env::new();
    let out = env.sh(&[], "hostname; ls /dev | tr '\\n' ' '; echo; echo x > /dev/null && head -c 4 /dev/urandom | wc -c; df -P /tmp | tail -1 | cut -d' ' -f1; touch /dev/new 2>/dev/null || echo DEV-RO");
    assert_ok(&out);
    let s = stdout(&out);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines[0], "agentd");
    assert_eq!(
        lines[1].trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    assert_eq!(lines[2], "4");
    assert_eq!(lines[3], "tmpfs");
    assert_eq!(lines[4], "DEV-RO");
}

#[test]
fn loopback_works_inside_the_job() {
    let env = Env::new();
    let py = "import socket\ns=socket.socket(); s.bind(('127.0.0.1', 8080)); s.listen()\nc=socket.create_connection(('127.0.0.1', 8080)); a,_=s.accept(); c.sendall(b'ping'); print(a.recv(4).decode())";
    let out = env.agentd(&[
        "run",
        "--policy",
        "ci-coding-agent",
        "--",
        "python3",
        "-c",
        py,
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "ping\n");
}
