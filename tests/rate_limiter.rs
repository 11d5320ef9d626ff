//! Firecracker's rate limiters on a running Linux guest (the suite's golden
//! guest, restored): a drive's `rate_limiter` and a network interface's
//! `rx_rate_limiter`/`tx_rate_limiter`, set with PATCH as Firecracker's users
//! set them on a running VM, slow the guest's disk reads and its ping replies
//! to the configured rate; removing them (a bucket of size 0) lifts the limit.
//! Times are measured by the guest's clock for the disk and by the host for
//! ping, and each limited run is compared with an unlimited one on the same VM.

mod common;

use std::time::{Duration, Instant};

use common::golden::{self, Netns};
use common::{curl, host, metric_sum, tmp_path, Running};

/// Reads the whole 1 MiB data drive with a cold cache; the guest's seconds.
fn read_disk(vm: &mut Running, n: u32) -> f64 {
    // The marker is computed by the shell, so the echo of the typed line
    // does not match it.
    vm.type_on_console(&format!(
        "echo 3 > /proc/sys/vm/drop_caches; read t0 x < /proc/uptime; \
         dd if=/dev/vda of=/dev/null bs=65536 2>/dev/null; read t1 x < /proc/uptime; \
         echo DISK-$(({n} * 1000))-$t0-$t1-END\n"
    ));
    let marker = format!("DISK-{}-", n * 1000);
    assert!(
        vm.wait_for(&marker, Duration::from_secs(180)),
        "the guest did not read its disk: {}",
        vm.stdout_now()
    );
    // The line is complete once END is printed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = vm.stdout_now();
        let line = out
            .lines()
            .find(|l| l.contains(&marker) && l.contains("-END"))
            .map(str::to_string);
        if let Some(line) = line {
            let rest = &line[line.find(&marker).unwrap() + marker.len()..];
            let mut parts = rest.trim_end_matches("-END").split('-');
            let t0: f64 = parts.next().unwrap().parse().unwrap();
            let t1: f64 = parts
                .next()
                .unwrap()
                .trim_end_matches("-END")
                .parse()
                .unwrap();
            return t1 - t0;
        }
        assert!(Instant::now() < deadline, "no END after {marker}: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host pings the guest 10 times, 0.2 s apart: (wall seconds, ping's output).
fn ping(ns: &Netns) -> (f64, String) {
    let (t, text) = ns.ping_guest(10, "0.2");
    (t.as_secs_f64(), text)
}

fn patch(sock: &std::path::Path, path: &str, body: &str) {
    assert_eq!(
        curl(sock, "PATCH", path, Some(body)),
        (204, String::new()),
        "PATCH {path} {body}"
    );
}

#[test]
fn patched_rate_limiters_slow_a_running_guests_disk_and_network_to_their_rate() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("ratelimit");
    ns.add_tap("vmmtap8", Some(&format!("{}/24", golden::HOST_IP)));
    let metrics = tmp_path("ratelimit.metrics");
    let _ = std::fs::remove_file(&metrics);
    let before = [(
        "/metrics",
        format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    )];
    let (mut vm, sock) = golden::restore_after(&ns, "vmmtap8", &g, "ratelimit", &before);

    // Disk: 1 MiB unlimited, then at 128 KiB/s (the first 128 KiB come from
    // the full bucket, the other 896 KiB take 7 s), then unlimited again.
    let free = read_disk(&mut vm, 1);
    patch(
        &sock,
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 131072, "refill_time": 1000}}}"#,
    );
    let limited = read_disk(&mut vm, 2);
    patch(
        &sock,
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
    );
    let lifted = read_disk(&mut vm, 3);
    eprintln!("disk, 1 MiB: unlimited {free:.2} s, 128 KiB/s {limited:.2} s, lifted {lifted:.2} s");

    // Network: 10 echo replies; at 2 frames per second in one direction they
    // take at least 4 s (2 at once, then one every 0.5 s).
    let (net_free, text_free) = ping(&ns);
    let two_per_second = r#"{"ops": {"size": 2, "refill_time": 1000}}"#;
    let off = r#"{"ops": {"size": 0, "refill_time": 0}}"#;
    patch(
        &sock,
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id": "eth0", "tx_rate_limiter": {two_per_second}}}"#),
    );
    let (net_tx, text_tx) = ping(&ns);
    patch(
        &sock,
        "/network-interfaces/eth0",
        &format!(
            r#"{{"iface_id": "eth0", "tx_rate_limiter": {off}, "rx_rate_limiter": {two_per_second}}}"#
        ),
    );
    let (net_rx, text_rx) = ping(&ns);
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).expect("JSON");
    patch(
        &sock,
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id": "eth0", "rx_rate_limiter": {off}}}"#),
    );
    let (net_lifted, text_lifted) = ping(&ns);
    eprintln!(
        "ping x10: unlimited {net_free:.2} s, tx 2/s {net_tx:.2} s, rx 2/s {net_rx:.2} s, lifted {net_lifted:.2} s"
    );

    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(flush)),
        (204, String::new())
    );
    let (_, cfg_after) = curl(&sock, "GET", "/vm/config", None);
    let cfg_after: serde_json::Value = serde_json::from_str(&cfg_after).expect("JSON");
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));

    let text = std::fs::read_to_string(&metrics).unwrap();
    let sum = |group: &str, key: &str| metric_sum(&metrics, group, key);
    eprintln!("asserting: the limited disk read takes 6-30 s and twice the unlimited one; limited pings take >= 3.5 s and twice the unlimited ones, all replied; lifted limits are fast again; throttle metrics; GET /vm/config shows the merged limiters; exit 0");
    assert!(
        (6.0..30.0).contains(&limited) && limited > 2.0 * free,
        "1 MiB at 128 KiB/s took {limited:.2} s (unlimited {free:.2} s)"
    );
    assert!(
        lifted < limited / 2.0,
        "lifted {lifted:.2} s, limited {limited:.2} s"
    );
    for (name, t, out) in [
        ("tx", net_tx, &text_tx),
        ("rx", net_rx, &text_rx),
        ("unlimited", net_free, &text_free),
        ("lifted", net_lifted, &text_lifted),
    ] {
        assert!(out.contains(", 10 received"), "{name}: {out}");
        if name == "tx" || name == "rx" {
            assert!(
                t >= 3.5 && t > 1.5 * net_free,
                "{name} limit: {t:.2} s (unlimited {net_free:.2} s)"
            );
        }
    }
    assert!(net_lifted < net_tx.min(net_rx), "lifted {net_lifted:.2} s");
    assert!(
        sum("block_data", "rate_limiter_throttled_events") > 0,
        "{text}"
    );
    assert!(sum("block_data", "rate_limiter_event_count") > 0, "{text}");
    assert!(sum("net_eth0", "tx_rate_limiter_throttled") > 0, "{text}");
    assert!(sum("net_eth0", "rx_rate_limiter_throttled") > 0, "{text}");
    assert!(sum("net_eth0", "tx_rate_limiter_event_count") > 0, "{text}");
    assert!(sum("net_eth0", "rx_event_rate_limiter_count") > 0, "{text}");
    // While the receive limit held: tx removed, rx set; afterwards neither,
    // and the drive's bucket removed.
    let iface = &cfg["network-interfaces"][0];
    assert!(iface["tx_rate_limiter"].is_null(), "{iface}");
    assert_eq!(iface["rx_rate_limiter"]["ops"]["size"], 2, "{iface}");
    let iface = &cfg_after["network-interfaces"][0];
    assert!(iface["rx_rate_limiter"].is_null(), "{iface}");
    assert!(
        cfg_after["drives"][0]["rate_limiter"].is_null(),
        "{cfg_after}"
    );
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
