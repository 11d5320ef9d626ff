//! The entropy device (Firecracker's `/entropy`, virtio-rng) in a clone of
//! the suite's golden Linux guest: the guest's hw_random core picks it, and
//! 64 KiB read from /dev/hwrng arrive, are not all alike, and are counted
//! in the `entropy` metrics.

mod common;

use std::time::Duration;

use common::golden::{self, Netns};
use common::{curl, host, metric_sum, tmp_path};

#[test]
fn a_restored_guest_reads_its_entropy_device() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("entropy");
    ns.add_tap("vmmtap10", None);
    let metrics = tmp_path("entropy.metrics");
    let _ = std::fs::remove_file(&metrics);
    let before = [(
        "/metrics",
        format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    )];
    let (mut vm, sock) = golden::restore_after(&ns, "vmmtap10", &g, "entropy", &before);
    // The source (sysfs is not mounted in the initramfs), the byte count,
    // and the count of distinct 4-byte words among the first 256 (random
    // data repeats none of them, in practice).
    vm.type_on_console("mkdir -p /sys && mount -t sysfs sys /sys\n");
    let source = golden::shell(
        &mut vm,
        "SRC",
        1,
        "cat /sys/class/misc/hw_random/rng_current",
    );
    let count = golden::shell(&mut vm, "COUNT", 2, "head -c 65536 /dev/hwrng | wc -c");
    let distinct = golden::shell(
        &mut vm,
        "WORDS",
        3,
        "head -c 1024 /dev/hwrng | od -An -tx4 -v | tr -s ' ' '\\n' | grep . | sort -u | wc -l",
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(flush)).0, 204);
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    let bytes = metric_sum(&metrics, "entropy", "entropy_bytes");
    eprintln!("asserting: rng_current virtio_rng.0, 65536 bytes read, 256 distinct words in 1 KiB, entropy_bytes >= 66560, the device in GET /vm/config, exit 0");
    assert_eq!(
        (source.as_str(), count.as_str(), distinct.as_str()),
        ("virtio_rng.0", "65536", "256")
    );
    assert!(bytes >= 65536 + 1024, "{bytes} entropy bytes");
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert!(cfg["entropy"].is_object(), "{cfg}");
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
