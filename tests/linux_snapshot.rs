//! Linux restored from the suite's golden snapshot (tests/common/golden.rs):
//! clones that run user-space code after the restore, at once, and a clone
//! on a TAP of its own that answers pings.

mod common;

use std::time::Duration;

use common::golden::{self, disk_byte, Netns};
use common::{host, tmp_path};

#[test]
fn five_concurrent_clones_run_user_space_after_the_restore_and_power_off_with_exit_0() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("clones");
    // Three over the API, two with the command-line form.
    let mut clones = Vec::new();
    for i in 0..5 {
        let tap = format!("vmmtapc{i}");
        ns.add_tap(&tap, None);
        clones.push(if i < 3 {
            golden::restore(&ns, &tap, &g, &format!("clone{i}"))
        } else {
            let sock = tmp_path(&format!("clone{i}.sock"));
            (
                golden::restore_cli(&ns, &tap, &g, &format!("clone{i}")),
                sock,
            )
        });
    }
    // Each clone computes a value of its own after the restore, and reads
    // its (reopened, shared read-only) disk.
    for (i, (vm, _)) in clones.iter_mut().enumerate() {
        vm.type_on_console(&format!(
            "echo CLONE-{i}-$(( {i} * 7919 + 1 ))-$(dd if=/dev/vda bs=1 skip=1000 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')\n"
        ));
    }
    for (i, (vm, _)) in clones.iter_mut().enumerate() {
        let want = format!("CLONE-{i}-{}-{}", i * 7919 + 1, disk_byte(1000));
        assert!(
            vm.wait_for(&want, Duration::from_secs(120)),
            "clone {i}: no {want:?}: {}",
            vm.stdout_now()
        );
        vm.type_on_console("poweroff -f\n");
    }
    eprintln!(
        "asserting: 5 clones printed their own value after the restore and powered off with exit 0"
    );
    for (i, (vm, sock)) in clones.into_iter().enumerate() {
        let out = vm.finish(Duration::from_secs(120));
        assert_eq!(out.code, Some(0), "clone {i}: {}", out.stderr);
        assert!(!sock.exists(), "clone {i} removed its socket");
    }
}

#[test]
fn a_clone_with_network_overrides_answers_pings_on_its_own_tap() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("clone-net");
    ns.add_tap("vmmtap7", Some(&format!("{}/24", golden::HOST_IP)));
    let (mut vm, _sock) = golden::restore(&ns, "vmmtap7", &g, "clone-net");
    let (_, text) = ns.ping_guest(20, "0.1");
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    eprintln!("asserting: 20 echo replies from the restored guest on vmmtap7, power-off, exit 0");
    assert!(text.contains(", 20 received"), "{text}");
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
