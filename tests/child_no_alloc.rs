//! The child side (between clone3 and execve) must not allocate or take locks, so that
//! the same code is safe to run from a multithreaded process. Proof: a malloc
//! interposer (LD_PRELOAD, built here with cc) that kills any process other than agentd
//! itself the moment it calls malloc, calloc, realloc or free.

mod common;
use common::*;

const GUARD: &str = r#"
#include <stdlib.h>
#include <unistd.h>
extern void *__libc_malloc(size_t), *__libc_calloc(size_t, size_t), *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
static pid_t parent;
__attribute__((constructor)) static void init(void) { parent = getpid(); }
static void check(void) {
    if (parent && getpid() != parent) {
        static const char msg[] = "ALLOCATION IN THE SANDBOX CHILD\n";
        write(2, msg, sizeof msg - 1);
        _exit(99);
    }
}
void *malloc(size_t n) { check(); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { check(); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { check(); return __libc_realloc(p, n); }
void free(void *p) { if (p) check(); __libc_free(p); }
"#;

#[test]
fn the_child_never_allocates() {
    let env = Env::new();
    let src = env.path("guard.c");
    let lib = env.path("guard.so");
    std::fs::write(&src, GUARD).unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("cc is needed to build the malloc guard");
    assert!(cc.status.success(), "{}", stderr(&cc));
    let ws = env.workspace("ws", None);
    let report_path = env.path("r.json");
    let out = env.agentd_with_env(
        &[
            "run",
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo ran",
        ],
        &[("LD_PRELOAD", lib.to_str().unwrap())],
    );
    assert!(
        !stderr(&out).contains("ALLOCATION IN THE SANDBOX CHILD"),
        "{}",
        stderr(&out)
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), "ran\n");
    // The guard is live: agentd itself allocated plenty (it would have died otherwise
    // only in the child), and the report exists.
    assert!(report_path.exists());
}
