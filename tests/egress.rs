//! The egress membrane, end to end: jobs in `proxy`, `none` and `host` mode against
//! servers this test starts in a network "lab" of its own.
//!
//! The lab is a network and mount namespace the test creates (`unshare -n -m`): its
//! loopback carries the test addresses 198.51.100.1 (TEST-NET-2, public for the proxy's
//! rules) and 10.9.9.9 (private), and its /etc/hosts (a bind mount inside the lab only)
//! names them: allowed.test and denied.test → 198.51.100.1, private.test → 10.9.9.9,
//! loopback.test → 127.0.0.1. HTTP (8080) and HTTPS (8443, a certificate made for the
//! run) servers listen there. agentd runs inside the lab (`nsenter`), so its proxy
//! resolves with the lab's hosts file and reaches only the lab's servers; nothing
//! outside the lab is touched.

mod common;

use common::daemon::{TestDaemon, rows, show, wait_until};
use common::{Env, code, report, stderr, stdout};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SERVER: &str = r#"
import http.server, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        body = ("hello from %s%s\n" % (self.headers.get("Host", "?"), self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
def serve(port, tls):
    s = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
serve(8080, False)
serve(8443, True)
print("ready", flush=True)
threading.Event().wait()
"#;

/// A raw SOCKS5 client: CONNECT by name, then one HTTP request.
const SOCKS: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", 1080), timeout=10)
s.sendall(b"\x05\x01\x00")
assert s.recv(2) == b"\x05\x00", "no-auth refused"
h = host.encode()
s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + port.to_bytes(2, "big"))
r = s.recv(10)
print("socks-reply", r[1])
if r[1] == 0:
    s.sendall(b"GET /socks HTTP/1.0\r\nHost: " + h + b"\r\n\r\n")
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    print(data.decode().split("\r\n\r\n", 1)[1].strip())
"#;

/// Name lookups through the job's resolver, and a datagram that needs a route.
const PROBE: &str = r#"
import socket, sys, errno
for n in sys.argv[1:]:
    try:
        print("resolve", n, socket.gethostbyname(n))
    except Exception as e:
        print("resolve", n, "error", e)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("198.51.100.1", 9))
    print("udp sent")
except OSError as e:
    print("udp", errno.errorcode.get(e.errno, e.errno))
t = socket.socket()
t.settimeout(5)
try:
    t.connect(("198.51.100.1", 8080))
    print("tcp connected")
except OSError as e:
    print("tcp", errno.errorcode.get(e.errno, e.errno))
"#;

/// The lab: its namespaces live as long as its server process.
struct Lab {
    server: std::process::Child,
    dir: PathBuf,
}

impl Lab {
    fn start(env: &Env) -> Lab {
        let dir = env.path("lab");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server.py"), SERVER).unwrap();
        std::fs::write(
            dir.join("hosts"),
            "127.0.0.1 localhost\n198.51.100.1 allowed.test denied.test\n10.9.9.9 private.test\n127.0.0.1 loopback.test\n",
        )
        .unwrap();
        let cert = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=allowed.test",
                "-addext",
                "subjectAltName=DNS:allowed.test,DNS:denied.test",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .output()
            .expect("openssl (the test makes a certificate for its HTTPS server)");
        assert!(cert.status.success(), "openssl: {}", stderr(&cert));
        let script = format!(
            "set -e; ip link set lo up; ip addr add 198.51.100.1/32 dev lo; ip addr add 10.9.9.9/32 dev lo; \
             mount --bind {d}/hosts /etc/hosts; exec /usr/bin/python3 {d}/server.py {d}/cert.pem {d}/key.pem",
            d = dir.display()
        );
        let mut server = Command::new("unshare")
            .args([
                "--net",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) and ip (iproute2) make the test's network lab");
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let _ = server.kill();
            let _ = server.wait();
            panic!("the lab's servers did not start (needs unshare, ip, python3, openssl)");
        }
        Lab { server, dir }
    }

    /// The command prefix that runs something inside the lab.
    fn nsenter(&self) -> Vec<String> {
        [
            "nsenter",
            "-t",
            &self.server.id().to_string(),
            "-n",
            "-m",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `agentd run ARGS` inside the lab, with the test's runtime directory.
    fn agentd(&self, env: &Env, args: &[&str]) -> std::process::Output {
        let pre = self.nsenter();
        let out = Command::new(&pre[0])
            .args(&pre[1..])
            .arg(common::AGENTD)
            .args(args)
            .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
            .env("AGENTD_POLICY_DIR", env.path("policies"))
            .env_remove("AGENTD_FAULT")
            .output()
            .expect("run agentd in the lab");
        env.assert_clean();
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A workspace holding the helper scripts and the lab's certificate, readable by the job.
fn workspace(env: &Env, lab: &Lab) -> PathBuf {
    let ws = env.workspace("ws", Some((1000, 1000)));
    std::fs::write(ws.join("socks.py"), SOCKS).unwrap();
    std::fs::write(ws.join("probe.py"), PROBE).unwrap();
    std::fs::copy(lab.dir.join("cert.pem"), ws.join("cert.pem")).unwrap();
    ws
}

/// A policy without the host's /etc/hosts, so names resolve through the job's resolver.
fn policy(env: &Env, network: &str) -> PathBuf {
    env.policy(
        "egress",
        &format!(
            r#"
[filesystem]
exec = ["/usr", "/bin", "/lib", {{ path = "/lib64", optional = true }}]
read = ["/etc/passwd", "/etc/group", {{ path = "/etc/ld.so.cache", optional = true }}]
[network]
{network}
"#
        ),
    )
}

/// The lines after `== NAME` up to the next section.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + name.len()
        + 4;
    let rest = &out[start..];
    &rest[..rest.find("== ").unwrap_or(rest.len())]
}

#[test]
fn proxy_mode_reaches_allowed_names_and_nothing_else() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let pol = policy(
        &env,
        r#"mode = "proxy"
allow_domains = ["allowed.test:8443", "allowed.test:8080", "private.test:8080", "loopback.test:8080"]"#,
    );
    let report_path = env.path("report.json");
    let script = r#"
echo "== env"; echo "$HTTPS_PROXY $ALL_PROXY"
echo "== bare-ip"; curl -sS --max-time 10 -D - http://198.51.100.1:8080/; echo "rc=$?"
echo "== https"; curl -sS --max-time 10 --cacert cert.pem https://allowed.test:8443/tls; echo "rc=$?"
echo "== socks"; python3 socks.py allowed.test 8080
echo "== socks-denied"; python3 socks.py denied.test 8080
echo "== denied"; curl -sS --max-time 10 -D - http://denied.test:8080/; echo "rc=$?"
echo "== denied-https"; curl -sS --max-time 10 --cacert cert.pem https://denied.test:8443/; echo "rc=$?"
echo "== private"; curl -sS --max-time 10 -D - http://private.test:8080/; echo "rc=$?"
echo "== loopback"; curl -sS --max-time 10 -D - http://loopback.test:8080/; echo "rc=$?"
echo "== bypass"; curl -sS --max-time 5 --noproxy '*' http://198.51.100.1:8080/; echo "rc=$?"
echo "== probe"; python3 probe.py allowed.test denied.test private.test
echo "== end"
"#;
    let out = lab.agentd(
        &env,
        &[
            "run",
            "--policy",
            pol.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let text = stdout(&out);
    let all = format!("stdout:\n{text}\nstderr:\n{}", stderr(&out));
    assert_eq!(code(&out), 0, "{all}");
    assert!(
        section(&text, "env").contains("http://127.0.0.1:3128 socks5h://127.0.0.1:1080"),
        "{all}"
    );
    // A bare address is refused even on an allowed port: names only.
    let bare = section(&text, "bare-ip");
    assert!(
        bare.contains("403") && bare.contains("bare address"),
        "{all}"
    );
    // An allowed name: HTTPS through HTTPS_PROXY (CONNECT), and a raw SOCKS5 socket.
    assert!(
        section(&text, "https").contains("hello from allowed.test:8443/tls\nrc=0"),
        "{all}"
    );
    let socks = section(&text, "socks");
    assert!(
        socks.contains("socks-reply 0") && socks.contains("hello from allowed.test/socks"),
        "{all}"
    );
    // A denied name: SOCKS5 "not allowed by ruleset"; HTTP 403 naming the rule and why;
    // the CONNECT refusal fails curl at once.
    assert!(
        section(&text, "socks-denied").contains("socks-reply 2"),
        "{all}"
    );
    let denied = section(&text, "denied");
    assert!(
        denied.contains("403 Forbidden")
            && denied.contains("X-Agentd-Denied: egress:network.allow_domains")
            && denied.contains(
                "no network.allow_domains pattern of policy egress matches denied.test:8080"
            ),
        "{all}"
    );
    let denied_https = section(&text, "denied-https");
    assert!(
        denied_https.contains("rc=56")
            && stderr(&out).contains("CONNECT tunnel failed, response 403"),
        "{all}"
    );
    // Names that resolve to private and loopback addresses: refused after resolving.
    for (name, kind) in [
        ("private", "10.9.9.9, a private"),
        ("loopback", "127.0.0.1, a loopback"),
    ] {
        let s = section(&text, name);
        assert!(
            s.contains("403") && s.contains(kind) && s.contains("allow_private"),
            "{name}: {all}"
        );
    }
    // A tool that ignores the proxy variables gets nowhere.
    assert!(!section(&text, "bypass").contains("rc=0"), "{all}");
    let probe = section(&text, "probe");
    assert!(probe.contains("resolve allowed.test 198.51.100.1"), "{all}");
    assert!(
        probe.contains("resolve denied.test error"),
        "NXDOMAIN for a denied name: {all}"
    );
    assert!(
        probe.contains("resolve private.test error"),
        "a name with only private addresses is not answered: {all}"
    );
    assert!(
        probe.contains("udp ENETUNREACH"),
        "no route out of the job's namespace: {all}"
    );
    assert!(
        probe.contains("tcp EACCES") || probe.contains("tcp ENETUNREACH"),
        "a direct TCP connection fails: {all}"
    );
    // The denials reached agentd's stderr with the rule.
    assert!(
        stderr(&out).contains("egress denied (http denied.test:8080)"),
        "{all}"
    );

    // The report: the mode, the proxy's endpoints, bytes per destination, the denials.
    let r = report(&report_path);
    let net = &r["network"];
    assert_eq!(net["mode"], "proxy", "{net}");
    assert_eq!(net["endpoints"]["socks5"], "127.0.0.1:1080");
    let dest = |d: &str| {
        net["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["destination"] == d)
            .unwrap_or_else(|| panic!("{d} in {net}"))
            .clone()
    };
    let tls = dest("allowed.test:8443");
    assert_eq!(tls["address"], "198.51.100.1:8443");
    assert!(
        tls["bytes_down"].as_u64().unwrap() > 500,
        "a TLS handshake came down: {tls}"
    );
    assert!(tls["bytes_up"].as_u64().unwrap() > 100, "{tls}");
    assert!(dest("allowed.test:8080")["bytes_down"].as_u64().unwrap() > 0);
    assert!(net["denied"].as_u64().unwrap() >= 6, "{net}");
    let denials = net["denials"].as_array().unwrap();
    assert!(
        denials
            .iter()
            .any(|d| d["destination"] == "denied.test:8080" && d["protocol"] == "socks5"),
        "{net}"
    );
    assert!(
        denials
            .iter()
            .any(|d| d["protocol"] == "dns" && d["destination"] == "denied.test"),
        "{net}"
    );
    // Landlock: the job may connect to the proxy's TCP ports only.
    let ll = &r["enforced"]["landlock"];
    assert_eq!(ll["tcp_connect"], serde_json::json!([3128, 1080]), "{ll}");
    assert_eq!(ll["tcp_connect_restricted"], true);
}

#[test]
fn private_destinations_need_allow_private() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let out = lab.agentd(
        &env,
        &[
            "run",
            "--workspace",
            ws.to_str().unwrap(),
            "--net",
            "proxy",
            "--allow-domain",
            "private.test:8080",
            "--allow-domain",
            "loopback.test:8080",
            "--allow-private",
            "--",
            "sh",
            "-c",
            "curl -sS --max-time 10 http://private.test:8080/p && curl -sS --max-time 10 http://loopback.test:8080/l",
        ],
    );
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out),
        "hello from private.test:8080/p\nhello from loopback.test:8080/l\n"
    );
}

#[test]
fn none_mode_has_no_way_out() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let pol = policy(&env, "mode = \"none\"");
    let report_path = env.path("report.json");
    let script = r#"
echo "== proxy"; curl -sS --max-time 5 --proxy http://127.0.0.1:3128 http://allowed.test:8080/; echo "rc=$?"
echo "== probe"; python3 probe.py allowed.test
echo "== end"
"#;
    let out = lab.agentd(
        &env,
        &[
            "run",
            "--policy",
            pol.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let text = stdout(&out);
    let all = format!("{text}{}", stderr(&out));
    assert_eq!(code(&out), 0, "{all}");
    assert!(
        !section(&text, "proxy").contains("rc=0"),
        "no proxy in none mode: {all}"
    );
    let probe = section(&text, "probe");
    assert!(probe.contains("resolve allowed.test error"), "{all}");
    assert!(probe.contains("udp ENETUNREACH"), "{all}");
    assert!(!probe.contains("tcp connected"), "{all}");
    let r = report(&report_path);
    assert_eq!(r["network"]["mode"], "none");
    assert!(r["network"].get("endpoints").is_none());
    assert!(
        r["enforced"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("net"))
    );
}

#[test]
fn host_mode_shares_the_network_and_says_so() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let report_path = env.path("report.json");
    let out = lab.agentd(
        &env,
        &[
            "run",
            "--net",
            "host",
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://198.51.100.1:8080/direct",
        ],
    );
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "hello from 198.51.100.1:8080/direct\n");
    let r = report(&report_path);
    assert_eq!(r["network"]["mode"], "host");
    assert!(
        !r["enforced"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("net")),
        "{}",
        r["enforced"]["namespaces"]
    );
    assert_eq!(r["enforced"]["landlock"]["tcp_connect_restricted"], false);
}

#[test]
fn bad_network_input_is_refused_before_anything_exists() {
    let env = Env::new();
    for (args, key, words) in [
        (
            vec!["--net", "wifi"],
            "--net",
            "expected none, proxy or host",
        ),
        (
            vec!["--allow-domain", "example.org"],
            "--allow-domain",
            "add --net proxy",
        ),
        (
            vec!["--net", "proxy", "--allow-domain", "10.0.0.1"],
            "--allow-domain",
            "is an address",
        ),
        (
            vec!["--net", "proxy", "--allow-domain", "ex ample.org:99999"],
            "--allow-domain",
            "expected a domain pattern",
        ),
        (
            vec!["--net", "host", "--allow-private"],
            "--allow-private",
            "add --net proxy",
        ),
    ] {
        let mut all = vec!["run"];
        all.extend(args.iter());
        all.extend(["--", "true"]);
        let out = env.agentd(&all);
        assert_eq!(code(&out), 125, "{args:?}: {}", stderr(&out));
        let e = stderr(&out);
        assert!(e.contains(key) && e.contains(words), "{args:?}: {e}");
    }
    let p = env.policy(
        "badnet",
        "[network]\nmode = \"proxy\"\nallow_domains = [\n\"ok.example\",\n\"*.\"]\n",
    );
    let out = env.agentd(&["run", "--policy", p.to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("badnet.toml:5: network.allow_domains:"),
        "{}",
        stderr(&out)
    );
    let p = env.policy("badmode", "[network]\nmode = \"open\"\n");
    let out = env.agentd(&["run", "--policy", p.to_str().unwrap(), "--", "true"]);
    assert!(
        stderr(&out)
            .contains("badmode.toml:2: network.mode: expected \"none\", \"proxy\" or \"host\""),
        "{}",
        stderr(&out)
    );
    let p = env.policy("nomode", "[network]\nallow_domains = [\"a.example\"]\n");
    let out = env.agentd(&["run", "--policy", p.to_str().unwrap(), "--", "true"]);
    assert!(
        stderr(&out).contains("set mode = \"proxy\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn daemon_jobs_get_the_proxy_and_denials_are_operation_rows() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let pre = lab.nsenter();
    let pre: Vec<&str> = pre.iter().map(String::as_str).collect();
    let d = TestDaemon::start_wrapped(&pre, &[], &[]);
    let out = d.ctl(&[
        "run",
        "--workspace",
        ws.to_str().unwrap(),
        "--net",
        "proxy",
        "--allow-domain",
        "allowed.test:8080",
        "--",
        "sh",
        "-c",
        "curl -sS --max-time 10 http://allowed.test:8080/d; curl -sS --max-time 10 http://denied.test:8080/; python3 socks.py denied.test 8080",
    ]);
    let text = common::daemon::out_text(&out);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text.contains("hello from allowed.test:8080/d"),
        "{}",
        show(&out)
    );
    assert!(text.contains("agentd egress: denied"), "{}", show(&out));
    assert!(text.contains("socks-reply 2"), "{}", show(&out));
    let job = d.jobs().into_iter().next().expect("one job");
    let id = job["id"].as_str().unwrap().to_owned();

    // Each denial is an operation row naming the rule; the job is the requester.
    let audit = d.audit();
    let denials = rows(&audit, "egress.connect", &id);
    assert_eq!(denials.len(), 2, "{denials:?}");
    for row in &denials {
        let authority = row["authority"].as_str().unwrap();
        assert!(
            authority.contains("denied by command line")
                || authority.contains("network.allow_domains"),
            "{row}"
        );
        assert_eq!(row["requester"]["uid"], 1000, "{row}");
        assert_eq!(row["change"]["allowed"], false);
    }
    assert_eq!(d.verify()["ok"], true);
    // Events: one allowed connection, two denials.
    wait_until("the egress events are out", Duration::from_secs(10), || {
        let ev = d.events();
        let count = |k: &str| {
            ev.iter()
                .filter(|e| e["kind"] == k && e["job"] == id.as_str())
                .count()
        };
        count("egress-allowed") == 1 && count("egress-denied") == 2
    });
    let filtered = d.ctl_ok(&["events", "--filter", &format!("egress-denied,{id}")]);
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    assert!(filtered.contains("denied.test:8080"), "{filtered}");
    // The job's report in inspect: bytes per destination.
    let info = d.job(&id);
    let dests = &info["report"]["network"]["destinations"];
    assert_eq!(dests[0]["destination"], "allowed.test:8080", "{info}");
    assert!(dests[0]["bytes_down"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["report"]["network"]["denied"], 2);
    let human = d.ctl_ok(&["inspect", &id]);
    assert!(
        human.contains("network:")
            && human.contains("proxy; allowed.test:8080 (")
            && human.contains("; 2 denied"),
        "{human}"
    );
    drop(d);
    assert_no_lab_leftovers(&env.runtime_dir());
}

fn assert_no_lab_leftovers(runtime: &Path) {
    if let Ok(entries) = std::fs::read_dir(runtime.join("jobs")) {
        assert_eq!(entries.count(), 0);
    }
}

#[test]
fn a_restarted_daemon_serves_an_adopted_jobs_proxy_again() {
    let env = Env::new();
    let lab = Lab::start(&env);
    let ws = workspace(&env, &lab);
    let pre = lab.nsenter();
    let pre: Vec<&str> = pre.iter().map(String::as_str).collect();
    let mut d = TestDaemon::start_wrapped(&pre, &[], &[]);
    // A durable job that fetches through its proxy every 100 ms, numbering each answer.
    let script = "i=0; while true; do i=$((i+1)); curl -sS --max-time 5 http://allowed.test:8080/$i >> fetched 2>&1; sleep 0.1; done";
    let id = d.run_detached(
        &[
            "--workspace",
            ws.to_str().unwrap(),
            "--net",
            "proxy",
            "--allow-domain",
            "allowed.test:8080",
        ],
        &["sh", "-c", script],
    );
    let fetched = ws.join("fetched");
    let answers = || std::fs::read_to_string(&fetched).unwrap_or_default();
    wait_until(
        "the job fetches through its proxy",
        Duration::from_secs(20),
        || answers().contains("hello from allowed.test:8080/"),
    );
    d.sigkill();
    d.launch();
    let before = answers().matches("hello from").count();
    wait_until(
        "the adopted job fetches again",
        Duration::from_secs(20),
        || answers().matches("hello from").count() >= before + 3,
    );
    assert_eq!(d.job(&id)["state"], "running");
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    d.wait_ended(&id);
}

#[test]
fn only_root_may_widen_a_jobs_network() {
    use common::daemon::{build_request, parse_response, raw_exchange_as};
    let env = Env::new();
    let lab = Lab::start(&env);
    let pre = lab.nsenter();
    let pre: Vec<&str> = pre.iter().map(String::as_str).collect();
    let d = TestDaemon::start_wrapped(&pre, &["--group", "nogroup"], &[]);
    let ws = d.path("member-ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(65534), Some(65534)).unwrap();
    let submit = |extra: &str| {
        let body = format!(
            r#"{{"command":["true"],"durable":true,"workspace":"{}"{extra}}}"#,
            ws.display()
        );
        let req = build_request("POST", "/v1/jobs", Some(body.as_bytes()));
        parse_response(&raw_exchange_as(65534, 65534, &[], &d.sock(), &req))
    };
    for (extra, words) in [
        (r#","net":"host""#, "only root may widen it to host"),
        (r#","net":"proxy""#, "only root may widen it to proxy"),
    ] {
        let r = submit(extra);
        assert_eq!(r.status, 403, "{extra}: {}", r.text());
        assert!(r.error(403).contains(words), "{extra}: {}", r.text());
    }
    // Narrowing is anyone's: a member runs the default (none) policy as it is.
    let r = submit(r#","net":"none""#);
    assert_eq!(r.status, 201, "{}", r.text());
    let refusals: Vec<_> = d
        .audit()
        .into_iter()
        .filter(|r| {
            r["action"] == "job.submit" && r["authority"].as_str().unwrap_or("").contains("network")
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
}
