//! Each role's filter, installed in a child process (this test binary run
//! again for one test, with VMM_SECCOMP_CHILD naming what to do): an allowed
//! call works, a call the role does not need kills the process with SIGSYS,
//! after the handler said which thread and which call.

use super::*;
use std::process::Command;

/// In the child: installs `role`'s default filter, makes `call` and says
/// what it returned (it never returns if the filter kills the process).
fn child(role: Role, call: &str) {
    let filters = Filters::default_filters().expect("the default filters compile");
    install_sigsys_handler().expect("the handler is installed");
    install(filters.program(role), role).expect("the filter is installed");
    let ret: i64 =
    // SAFETY: each call below is a plain system call with valid pointer
    // arguments (NUL-terminated strings, null argv/envp) or none.
    unsafe {
        match call {
            "write" => libc::write(2, b"child: write works\n".as_ptr().cast(), 19) as i64,
            "getpid" => libc::getpid() as i64,
            "sched_yield" => libc::sched_yield() as i64,
            "socket_unix" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64,
            "socket_inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null()) as i64
            }
            "open" => libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) as i64,
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) as i64,
            "kvm_run_badfd" => libc::ioctl(-1, 44672) as i64,
            "kvm_create_vm_badfd" => libc::ioctl(-1, 44545) as i64,
            "accept_badfd" => {
                libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), 0) as i64
            }
            "mmap_exec" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "mmap_rw" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            other => panic!("unknown call {other}"),
        }
    };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let line = format!("child: {call} returned {ret} errno {errno}\n");
    raw_write(2, line.as_bytes());
    // SAFETY: _exit ends the process at once; allowed by every filter.
    unsafe { libc::_exit(0) };
}

/// Runs `call` under `role`'s filter in a child; returns (killed by
/// SIGSYS, stderr).
fn in_child(role: Role, call: &str) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp::tests::child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMM_SECCOMP_CHILD", format!("{}:{call}", role.name()))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let killed = out.status.signal() == Some(libc::SIGSYS);
    (killed, String::from_utf8_lossy(&out.stderr).to_string())
}

/// The child's entry point; does nothing in an ordinary test run.
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var("VMM_SECCOMP_CHILD") else {
        return;
    };
    let (role, call) = spec.split_once(':').unwrap();
    let role = Role::ALL.into_iter().find(|r| r.name() == role).unwrap();
    child(role, call);
}

fn assert_allowed(role: Role, call: &str) {
    let (killed, err) = in_child(role, call);
    assert!(!killed, "{} {call} was killed: {err}", role.name());
    assert!(err.contains(&format!("child: {call} returned")), "{err}");
}

fn assert_killed(role: Role, call: &str, nr: i64) {
    let (killed, err) = in_child(role, call);
    assert!(
        killed,
        "{} {call} was not killed by SIGSYS: {err}",
        role.name()
    );
    let said = format!(
        "vmm: the {} thread made system call {nr}, which its seccomp filter does not allow",
        role.name()
    );
    assert!(err.contains(&said), "{err}");
    assert!(!err.contains("returned"), "{err}");
}

/// The standard library's channels back off with sched_yield under
/// contention (the VMM thread answering the API was killed by SIGSYS once).
#[test]
fn every_role_may_yield() {
    for role in Role::ALL {
        assert_allowed(role, "sched_yield");
    }
}

#[test]
fn vcpu_runs_kvm_and_nothing_else() {
    assert_allowed(Role::Vcpu, "write");
    assert_allowed(Role::Vcpu, "kvm_run_badfd");
    assert_allowed(Role::Vcpu, "mmap_rw");
    assert_killed(Role::Vcpu, "open", libc::SYS_openat);
    assert_killed(Role::Vcpu, "execve", libc::SYS_execve);
    assert_killed(Role::Vcpu, "socket_unix", libc::SYS_socket);
    assert_killed(Role::Vcpu, "ptrace", libc::SYS_ptrace);
    assert_killed(Role::Vcpu, "kvm_create_vm_badfd", libc::SYS_ioctl);
    assert_killed(Role::Vcpu, "mmap_exec", libc::SYS_mmap);
}

#[test]
fn api_serves_connections_and_opens_nothing() {
    assert_allowed(Role::Api, "accept_badfd");
    assert_allowed(Role::Api, "getpid");
    assert_killed(Role::Api, "socket_unix", libc::SYS_socket);
    assert_killed(Role::Api, "open", libc::SYS_openat);
    assert_killed(Role::Api, "execve", libc::SYS_execve);
    assert_killed(Role::Api, "kvm_run_badfd", libc::SYS_ioctl);
}

#[test]
fn vmm_has_unix_sockets_but_no_network_or_exec() {
    assert_allowed(Role::Vmm, "socket_unix");
    assert_allowed(Role::Vmm, "write");
    assert_killed(Role::Vmm, "socket_inet", libc::SYS_socket);
    assert_killed(Role::Vmm, "execve", libc::SYS_execve);
    assert_killed(Role::Vmm, "ptrace", libc::SYS_ptrace);
    assert_killed(Role::Vmm, "kvm_run_badfd", libc::SYS_ioctl);
    assert_killed(Role::Vmm, "mmap_exec", libc::SYS_mmap);
}

#[test]
fn the_kick_signal_is_the_one_the_filters_allow() {
    // tgkill is allowed for signal 34 only (besides SIGSYS).
    assert_eq!(crate::vstate::vcpu::kick_signal(), 34);
}

#[test]
fn a_filter_file_needs_every_role_and_valid_json() {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("f.json");
    std::fs::write(
        &f,
        r#"{"vmm": {"mismatch_action": "trap", "match_action": "allow", "filter": []}}"#,
    )
    .unwrap();
    let e = Filters::from_file(&f).err().unwrap().to_string();
    assert!(e.contains("has no 'api' filter"), "{e}");
    std::fs::write(&f, "{not json").unwrap();
    let e = Filters::from_file(&f).err().unwrap().to_string();
    assert!(e.contains("is not a valid seccompiler JSON filter"), "{e}");
    let e = Filters::from_file(&dir.join("missing.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("Cannot read the seccomp filter file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_built_filters_are_the_json_compiled() {
    let built = Filters::default_filters().unwrap();
    let compiled = Filters::compile(DEFAULT_JSON.as_bytes(), "x86_64.json").unwrap();
    for role in Role::ALL {
        assert_eq!(
            built.program(role),
            compiled.program(role),
            "{}",
            role.name()
        );
        assert!(built.program(role).len() > 40, "{}", role.name());
    }
}

#[test]
fn the_handler_formats_numbers_without_allocating() {
    let mut l = Line::new();
    l.push(b"n=");
    l.push_num(0);
    l.push(b",");
    l.push_num(18_446_744_073_709_551_615);
    assert_eq!(l.bytes(), b"n=0,18446744073709551615");
}

/// One BPF instruction: code, jt, jf, k.
type Insn = (u16, u8, u8, u32);

/// seccompiler-bin's layout, written by hand: the three roles' programs.
fn bpf_file(roles: &[(&str, &[Insn])]) -> Vec<u8> {
    let mut out = (roles.len() as u64).to_le_bytes().to_vec();
    for (name, insns) in roles {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(insns.len() as u64).to_le_bytes());
        for (code, jt, jf, k) in insns.iter() {
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&[*jt, *jf]);
            out.extend_from_slice(&k.to_le_bytes());
        }
    }
    out
}

#[test]
fn a_compiled_bpf_file_loads_as_firecracker_s_does() {
    // BPF_RET | BPF_K, SECCOMP_RET_ALLOW: allow everything.
    let allow: &[Insn] = &[(0x06, 0, 0, 0x7fff_0000)];
    let file = bpf_file(&[("vmm", allow), ("api", allow), ("vcpu", allow)]);
    let path = std::env::temp_dir().join(format!("vmm-bpf-{}.bpf", std::process::id()));
    std::fs::write(&path, &file).unwrap();
    let filters = Filters::from_file(&path).unwrap();
    assert_eq!(filters.program(Role::Vcpu).len(), 1);
    assert_eq!(filters.program(Role::Api)[0].k, 0x7fff_0000);

    // Firecracker's own test writes these bytes and looks for this line.
    std::fs::write(&path, b"Invalid BPF!").unwrap();
    let e = Filters::from_file(&path).err().unwrap().to_string();
    assert!(
        e.starts_with("Seccomp error: Filter deserialization failed"),
        "{e}"
    );

    // Hostile lengths fail without allocating what they announce.
    let mut huge = file.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode_bpf(&huge).is_err());
    assert!(decode_bpf(&file[..file.len() - 1]).is_err(), "truncated");
    let mut trailing = file.clone();
    trailing.push(0);
    assert!(
        decode_bpf(&trailing).is_ok(),
        "trailing bytes are ignored, as Firecracker"
    );
    assert!(
        decode_bpf(&vec![0u8; 100_001]).is_err(),
        "over Firecracker's size limit"
    );
    let missing = bpf_file(&[("vmm", allow), ("api", allow)]);
    std::fs::write(&path, &missing).unwrap();
    let e = Filters::from_file(&path).err().unwrap().to_string();
    assert!(e.contains("'vcpu'"), "{e}");
    std::fs::remove_file(&path).unwrap();
}
