//! Security: what the default policy does not grant is denied by the kernel, observed
//! from inside the job. Each test also checks the allowed counterpart where there is one,
//! so a broken job (not a working sandbox) cannot make it pass.

mod common;
use common::*;
use std::net::TcpListener;

#[test]
fn writes_outside_workspace_and_tmp_are_denied() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    let out = env.sh(
        &["--workspace", ws.to_str().unwrap()],
        "for p in /usr/agentd-x /etc/agentd-x /agentd-x /proc/agentd-x /dev/agentd-x; do \
           if touch $p 2>/dev/null; then echo WROTE $p; fi; done; \
         touch ./in-workspace && touch /tmp/in-tmp && echo ALLOWED-OK",
    );
    assert_ok(&out);
    let s = stdout(&out);
    assert!(!s.contains("WROTE"), "{s}");
    assert!(s.contains("ALLOWED-OK"), "{s}");
    assert!(ws.join("in-workspace").exists());
    assert!(
        !std::path::Path::new("/usr/agentd-x").exists()
            && !std::path::Path::new("/etc/agentd-x").exists()
    );
}

#[test]
fn etc_shadow_is_unreadable_even_when_etc_is_granted() {
    let env = Env::new();
    let p = env.policy("etc", "[filesystem]\nexec = [\"/usr\", \"/bin\", \"/lib\", { path = \"/lib64\", optional = true }]\nread = [\"/etc\"]\n");
    let out = env.sh(&["--policy", p.to_str().unwrap()], "test -e /etc/shadow && echo SHADOW-PRESENT; cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW; cat /etc/passwd >/dev/null && echo READ-PASSWD");
    assert_ok(&out);
    let s = stdout(&out);
    assert!(
        s.contains("SHADOW-PRESENT") && s.contains("READ-PASSWD"),
        "{s}"
    );
    assert!(!s.contains("READ-SHADOW"), "job read /etc/shadow: {s}");
}

#[test]
fn host_processes_are_invisible_and_unsignalable() {
    let env = Env::new();
    let mut victim = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = victim.id();
    let out = env.sh(&[], &format!("ls /proc | grep -c '^[0-9]'; kill -0 {pid} 2>/dev/null && echo SEES-HOST; kill -TERM {pid} 2>/dev/null && echo SIGNALLED; kill -TERM -1 2>/dev/null; echo done"));
    let s = stdout(&out);
    let visible: usize = s
        .lines()
        .next()
        .unwrap_or("99")
        .trim()
        .parse()
        .unwrap_or(99);
    assert!(visible <= 6, "job sees {visible} processes:\n{s}");
    assert!(!s.contains("SEES-HOST") && !s.contains("SIGNALLED"), "{s}");
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the host process was killed"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn host_loopback_tcp_listener_is_unreachable() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = env.agentd(&["run", "--", "python3", "-c", &format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('CONNECTED')\nexcept OSError as e:\n    print('REFUSED', e.errno)\n")]);
    assert_ok(&out);
    assert!(stdout(&out).contains("REFUSED"), "{}", stdout(&out));
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
}

#[test]
fn mounting_is_denied() {
    let env = Env::new();
    let out = env.sh(
        &[],
        "mount -t tmpfs none /tmp 2>&1; echo rc=$?; mount --bind /usr /tmp 2>&1; echo rc=$?",
    );
    let s = stdout(&out);
    assert!(s.matches("rc=0").count() == 0, "a mount succeeded: {s}");
    assert!(s.contains("rc=32") || s.contains("rc=1"), "{s}");
    // and through the new mount API, straight to the syscall
    let out = env.agentd(&["run", "--", "python3", "-c", "import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.syscall(430, b'tmpfs', 0)\nprint(r, ctypes.get_errno())"]);
    assert_eq!(stdout(&out).trim(), "-1 1", "fsopen: {}", stdout(&out));
}

#[test]
fn creating_a_user_namespace_is_denied() {
    let env = Env::new();
    let out = env.sh(
        &[],
        "unshare -U true 2>&1; echo rc=$?; unshare -r -n true 2>&1; echo rc=$?",
    );
    let s = stdout(&out);
    assert!(!s.contains("rc=0"), "{s}");
    assert!(
        s.contains("Operation not permitted") || s.contains("Function not implemented"),
        "{s}"
    );
}

#[test]
fn loading_a_bpf_program_is_denied() {
    let env = Env::new();
    // bpf(BPF_PROG_LOAD, NULL, 0): EPERM from seccomp (the kernel alone would say EFAULT/EINVAL).
    let out = env.agentd(&["run", "--", "python3", "-c", "import ctypes\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.syscall(321, 5, 0, 0)\nprint(r, ctypes.get_errno())"]);
    assert_eq!(stdout(&out).trim(), "-1 1", "{}", stdout(&out));
}

#[test]
fn ptrace_of_a_process_outside_the_job_is_denied() {
    let env = Env::new();
    let mut victim = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let out = env.agentd(&["run", "--", "python3", "-c", &format!(
        "import ctypes\nlibc=ctypes.CDLL(None,use_errno=True)\nr=libc.ptrace(16, {}, 0, 0)\nprint(r, ctypes.get_errno())", victim.id())]);
    assert_eq!(
        stdout(&out).trim(),
        "-1 1",
        "PTRACE_ATTACH: {}",
        stdout(&out)
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn setuid_binary_gains_nothing() {
    let env = Env::new();
    let ws = env.workspace("ws", Some((1000, 1000)));
    let suid = ws.join("suid-id");
    std::fs::copy("/usr/bin/id", &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let out = env.sh(
        &["--workspace", ws.to_str().unwrap()],
        "./suid-id -u; ./suid-id -ru; grep CapEff /proc/self/status",
    );
    assert_ok(&out);
    let s = stdout(&out);
    let mut lines = s.lines();
    assert_eq!(lines.next(), Some("1000"), "effective uid changed: {s}");
    assert_eq!(lines.next(), Some("1000"), "{s}");
    assert!(s.contains("CapEff:\t0000000000000000"), "{s}");
}

#[test]
fn host_abstract_unix_socket_is_unreachable() {
    use std::os::linux::net::SocketAddrExt;
    let env = Env::new();
    let name = format!("agentd-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let out = env.agentd(&["run", "--", "python3", "-c", &format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0{name}')\n    print('CONNECTED')\nexcept OSError as e:\n    print('DENIED', e.errno)\n")]);
    assert_ok(&out);
    assert!(stdout(&out).contains("DENIED"), "{}", stdout(&out));
    assert!(listener.accept().is_err());
}

#[test]
fn job_runs_unprivileged_with_no_capabilities() {
    let env = Env::new();
    let out = env.sh(&[], "id -u; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; cat /proc/self/uid_map");
    assert_ok(&out);
    let s = stdout(&out);
    assert!(s.starts_with("65534\n"), "{s}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            s.contains(&format!("{cap}:\t0000000000000000")),
            "{cap} not empty: {s}"
        );
    }
    assert!(
        s.contains("NoNewPrivs:\t1") && s.contains("Seccomp:\t2"),
        "{s}"
    );
    let map: Vec<&str> = s.lines().last().unwrap().split_whitespace().collect();
    assert_eq!(
        map,
        ["65534", "65534", "1"],
        "host root must not be mapped: {s}"
    );
}

#[test]
fn tiocsti_and_io_uring_are_denied() {
    let env = Env::new();
    let out = env.agentd(&["run", "--", "python3", "-c",
        "import ctypes\nlibc=ctypes.CDLL(None,use_errno=True)\nc=ctypes.c_char(b'x')\nr=libc.ioctl(0, 0x5412, ctypes.byref(c))\nprint(r, ctypes.get_errno())\nr=libc.syscall(425, 8, None)\nprint(r, ctypes.get_errno())"]);
    assert_eq!(stdout(&out).trim(), "-1 1\n-1 1", "{}", stdout(&out));
}

#[test]
fn landlock_denies_exec_where_only_read_is_granted() {
    // A read grant is mounted read-only, which does not stop execution: only Landlock's
    // missing Execute right does. The same file runs when the directory is granted exec.
    let env = Env::new();
    let dir = tempfile::Builder::new()
        .prefix("agentd-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let script = dir.path().join("hello");
    std::fs::write(&script, "#!/bin/sh\necho RAN\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let base = "exec = [\"/usr\", \"/bin\", \"/lib\", { path = \"/lib64\", optional = true }]\n";
    let d = dir.path().display();
    let read_only = env.policy("ro", &format!("[filesystem]\n{base}read = [\"{d}\"]\n"));
    let out = env.agentd(&[
        "run",
        "--policy",
        read_only.to_str().unwrap(),
        "--",
        script.to_str().unwrap(),
    ]);
    assert_eq!(
        code(&out),
        126,
        "stdout: {} stderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    let out = env.sh(
        &["--policy", read_only.to_str().unwrap()],
        &format!("cat {d}/hello >/dev/null && echo READABLE"),
    );
    assert!(stdout(&out).contains("READABLE"), "{}", stdout(&out));
    let exec = env.policy("x", &format!("[filesystem]\nexec = [\"{d}\", \"/usr\", \"/bin\", \"/lib\", {{ path = \"/lib64\", optional = true }}]\n"));
    let out = env.agentd(&[
        "run",
        "--policy",
        exec.to_str().unwrap(),
        "--",
        script.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "RAN\n");
}

#[test]
fn landlock_tcp_rules_allow_only_granted_ports() {
    // Inside the job's own network namespace: ci-coding-agent grants bind on 8080, not 8081.
    let env = Env::new();
    let out = env.agentd(&["run", "--policy", "ci-coding-agent", "--", "python3", "-c",
        "import socket\nfor p in (8080, 8081):\n    s=socket.socket()\n    try:\n        s.bind(('127.0.0.1', p)); print(p, 'bound')\n    except OSError as e:\n        print(p, 'denied', e.errno)\n"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "8080 bound\n8081 denied 13\n");
}
