//! The job's seccomp filter: deny with EPERM the syscalls a job never needs.
//!
//! Written as raw BPF, not with seccompiler: seccompiler 0.5 has one match action per
//! filter (we need EPERM, ENOSYS for clone3 and argument checks in one program) and no
//! guard against x32 syscall numbers, which would let a deny list be bypassed. This is
//! ~150 lines with a label assembler, and its exact bytes are hashed into the report.
//!
//! The filter allows by default and denies a list, because agents run arbitrary
//! toolchains; the list is what no build, test or shell needs, and what a job would use
//! to attack the kernel or escape:
//!
//! | syscalls | why denied |
//! |---|---|
//! | init_module finit_module delete_module kexec_load kexec_file_load | kernel code loading |
//! | reboot swapon swapoff acct quotactl quotactl_fd iopl ioperm syslog vhangup | host administration |
//! | settimeofday clock_settime clock_adjtime adjtimex | the host's clock |
//! | mount umount2 pivot_root chroot open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr open_tree_attr | the mount family and the new mount API: the job's filesystem view is fixed |
//! | setns; unshare and clone with any CLONE_NEW* flag; clone3 (ENOSYS, so libc falls back to clone, whose flags can be checked) | namespace creation: user namespaces are the usual kernel attack surface |
//! | bpf perf_event_open | kernel programs and PMU access |
//! | keyctl add_key request_key | the kernel keyring is not namespaced |
//! | ptrace process_vm_readv process_vm_writev pidfd_getfd | reading or steering other processes |
//! | userfaultfd | stalls kernel paths at will; a job given a region gets a /dev/userfaultfd descriptor from the region broker instead, after an open its policy allows (the syscall stays denied) |
//! | io_uring_setup io_uring_enter io_uring_register | bypasses seccomp for the operations it performs |
//! | ioctl TIOCSTI, TIOCLINUX | typing into, or reading, the controlling terminal |
//! | personality other than PER_LINUX or a query | turns off ASLR and similar |
//! | open_by_handle_at name_to_handle_at lookup_dcookie fanotify_init uselib nfsservctl | file handles bypass path checks; obsolete or privileged |
//! | any x32 number (bit 30 set), any non-x86_64 arch (int 0x80) | other ABIs would dodge the list |

use sha2::{Digest, Sha256};

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// open_tree_attr (Linux 6.15) is newer than the libc crate's table.
const SYS_OPEN_TREE_ATTR: i64 = 467;

const CLONE_NEW_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;
/// unshare() also takes CLONE_NEWTIME (0x80), which for clone() is part of the exit signal.
const UNSHARE_NEW_FLAGS: u32 = CLONE_NEW_FLAGS | 0x80;

#[cfg(target_arch = "x86_64")]
const DENIED: &[(&str, i64)] = &[
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("uselib", libc::SYS_uselib),
    ("nfsservctl", libc::SYS_nfsservctl),
];

#[cfg(not(target_arch = "x86_64"))]
compile_error!("agentd's seccomp filter is written for x86_64; add this architecture's table");

/// A compiled filter, ready for prctl(PR_SET_SECCOMP).
#[derive(Debug, Clone)]
pub struct SeccompProgram {
    pub instructions: Vec<libc::sock_filter>,
    /// Names of everything denied, for the report.
    pub denied: Vec<String>,
    pub sha256: String,
}

/// Symbolic jump targets, resolved when the program is assembled.
#[derive(Clone, Copy, PartialEq)]
enum Label {
    Next,
    Allow,
    Eperm,
    Enosys,
}

enum Insn {
    Stmt(u16, u32),
    Jump {
        code: u16,
        k: u32,
        jt: Label,
        jf: Label,
    },
    Ret(Label),
    /// If the syscall number is not `nr`, skip the next `len` instructions.
    Guard {
        nr: u32,
        len: u8,
    },
}

pub fn build() -> SeccompProgram {
    use Label::*;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    // struct seccomp_data: nr @0, arch @4, ip @8, args[6] @16 (u64 each, little endian).
    let arg_lo = |n: u32| 16 + 8 * n;

    let mut p = vec![
        Insn::Stmt(LD_W_ABS, 4),
        Insn::Jump {
            code: JEQ,
            k: AUDIT_ARCH_X86_64,
            jt: Next,
            jf: Eperm,
        },
        Insn::Stmt(LD_W_ABS, 0),
        Insn::Jump {
            code: JGE,
            k: X32_SYSCALL_BIT,
            jt: Eperm,
            jf: Next,
        },
    ];
    for (_, nr) in DENIED {
        p.push(Insn::Jump {
            code: JEQ,
            k: *nr as u32,
            jt: Eperm,
            jf: Next,
        });
    }
    p.push(Insn::Jump {
        code: JEQ,
        k: libc::SYS_clone3 as u32,
        jt: Enosys,
        jf: Next,
    });

    // Argument checks: each block reloads the syscall number after it, so blocks can
    // be added without tracking what the accumulator holds.
    let arg_block = |p: &mut Vec<Insn>, nr: i64, arg: u32, check: &dyn Fn(&mut Vec<Insn>)| {
        let start = p.len();
        p.push(Insn::Guard { nr: 0, len: 0 }); // filled in once the block's length is known
        p.push(Insn::Stmt(LD_W_ABS, arg_lo(arg)));
        check(p);
        p.push(Insn::Ret(Allow));
        let len = p.len() - start - 1;
        p[start] = Insn::Guard {
            nr: nr as u32,
            len: u8::try_from(len).expect("short block"),
        };
    };
    arg_block(&mut p, libc::SYS_ioctl, 1, &|p| {
        p.push(Insn::Jump {
            code: JEQ,
            k: libc::TIOCSTI as u32,
            jt: Eperm,
            jf: Next,
        });
        p.push(Insn::Jump {
            code: JEQ,
            k: libc::TIOCLINUX as u32,
            jt: Eperm,
            jf: Next,
        });
    });
    arg_block(&mut p, libc::SYS_clone, 0, &|p| {
        p.push(Insn::Jump {
            code: JSET,
            k: CLONE_NEW_FLAGS,
            jt: Eperm,
            jf: Next,
        });
    });
    arg_block(&mut p, libc::SYS_unshare, 0, &|p| {
        p.push(Insn::Jump {
            code: JSET,
            k: UNSHARE_NEW_FLAGS,
            jt: Eperm,
            jf: Next,
        });
    });
    arg_block(&mut p, libc::SYS_personality, 0, &|p| {
        p.push(Insn::Jump {
            code: JEQ,
            k: 0,
            jt: Allow,
            jf: Next,
        });
        p.push(Insn::Jump {
            code: JEQ,
            k: 0xffff_ffff,
            jt: Allow,
            jf: Eperm,
        });
    });
    p.push(Insn::Ret(Allow));
    p.push(Insn::Ret(Eperm));
    p.push(Insn::Ret(Enosys));

    let instructions = assemble(&p);
    let mut denied: Vec<String> = DENIED.iter().map(|(n, _)| (*n).to_owned()).collect();
    denied.extend(
        [
            "clone3 (ENOSYS)",
            "clone/unshare with CLONE_NEW*",
            "ioctl TIOCSTI",
            "ioctl TIOCLINUX",
            "personality changes",
            "x32 syscalls",
            "non-x86_64 syscalls",
        ]
        .map(str::to_owned),
    );
    let mut hash = Sha256::new();
    for i in &instructions {
        hash.update(i.code.to_le_bytes());
        hash.update([i.jt, i.jf]);
        hash.update(i.k.to_le_bytes());
    }
    SeccompProgram {
        instructions,
        denied,
        sha256: crate::spec::hex(&hash.finalize()),
    }
}

/// Resolves labels into relative jumps. The shared returns are the last three
/// instructions: ALLOW (from the default path), EPERM, ENOSYS.
fn assemble(p: &[Insn]) -> Vec<libc::sock_filter> {
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let n = p.len();
    let target = |label: Label| match label {
        Label::Allow => n - 3,
        Label::Eperm => n - 2,
        Label::Enosys => n - 1,
        Label::Next => unreachable!(),
    };
    let rel = |from: usize, label: Label| -> u8 {
        if label == Label::Next {
            return 0;
        }
        let off = target(label) - from - 1;
        u8::try_from(off).expect("seccomp jump longer than 255 instructions")
    };
    p.iter()
        .enumerate()
        .map(|(i, insn)| match *insn {
            Insn::Guard { nr, len } => libc::sock_filter {
                code: JEQ,
                jt: 0,
                jf: len,
                k: nr,
            },
            Insn::Stmt(code, k) => libc::sock_filter {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            Insn::Jump { code, k, jt, jf } => libc::sock_filter {
                code,
                jt: rel(i, jt),
                jf: rel(i, jf),
                k,
            },
            Insn::Ret(label) => {
                let k = match label {
                    Label::Allow => SECCOMP_RET_ALLOW,
                    Label::Eperm => SECCOMP_RET_ERRNO | libc::EPERM as u32,
                    Label::Enosys => SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
                    Label::Next => unreachable!(),
                };
                libc::sock_filter {
                    code: RET_K,
                    jt: 0,
                    jf: 0,
                    k,
                }
            }
        })
        .collect()
}

/// Installs the filter on the calling thread. no_new_privs must already be set.
/// Called last, right before execve: after this, even agentd's own setup could not
/// mount or unshare.
pub fn install(program: &SeccompProgram) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: program.instructions.len() as u16,
        filter: program.instructions.as_ptr() as *mut _,
    };
    // SAFETY: fprog points at `program.instructions`, alive for the call; the kernel
    // copies the program.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BPF interpreter for the subset `build` emits, to test decisions without
    /// installing the filter.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            let class = i.code & 0x07;
            match class {
                0x00 => {
                    acc =
                        u32::from_le_bytes(data[i.k as usize..i.k as usize + 4].try_into().unwrap())
                }
                0x05 => {
                    let taken = match i.code & 0xf0 {
                        0x10 => acc == i.k,
                        0x30 => acc >= i.k,
                        0x40 => acc & i.k != 0,
                        op => panic!("op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return i.k,
                c => panic!("class {c:#x}"),
            }
            pc += 1;
        }
    }

    const EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn decisions() {
        let p = build().instructions;
        let x = |nr: i64, args: [u64; 6]| run(&p, AUDIT_ARCH_X86_64, nr as u32, args);
        assert_eq!(x(libc::SYS_read, [0; 6]), SECCOMP_RET_ALLOW);
        assert_eq!(x(libc::SYS_mount, [0; 6]), EPERM);
        assert_eq!(x(libc::SYS_bpf, [0; 6]), EPERM);
        assert_eq!(
            x(libc::SYS_clone3, [0; 6]),
            SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(
            x(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            x(libc::SYS_clone, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            x(libc::SYS_unshare, [libc::CLONE_FILES as u64, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            x(
                libc::SYS_unshare,
                [libc::CLONE_NEWNET as u64, 0, 0, 0, 0, 0]
            ),
            EPERM
        );
        assert_eq!(x(libc::SYS_ioctl, [1, libc::TIOCSTI, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            x(libc::SYS_ioctl, [1, libc::TIOCGWINSZ, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            x(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(x(libc::SYS_personality, [0x0040000, 0, 0, 0, 0, 0]), EPERM);
        assert_eq!(x(libc::SYS_write, [0; 6]), SECCOMP_RET_ALLOW);
        assert_eq!(
            run(
                &p,
                AUDIT_ARCH_X86_64,
                X32_SYSCALL_BIT | libc::SYS_read as u32,
                [0; 6]
            ),
            EPERM
        );
        assert_eq!(run(&p, 0x4000_0003 /* i386 */, 1, [0; 6]), EPERM);
    }
}
