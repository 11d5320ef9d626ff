//! The balloon (Firecracker's `/balloon`) in a clone of the suite's golden
//! Linux guest, which has an empty balloon with statistics every second: the
//! guest's statistics arrive; PATCH /balloon to 32 MiB makes the guest give
//! 32 MiB (its MemTotal drops by that much, as its driver accounts pages it
//! gave away without DEFLATE_ON_OOM); back to 0 returns them.

mod common;

use std::time::{Duration, Instant};

use common::golden::{self, Netns};
use common::{curl, host};

fn stats(sock: &std::path::Path) -> serde_json::Value {
    let (code, body) = curl(sock, "GET", "/balloon/statistics", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the guest reports `mib` in the balloon.
fn wait_actual(sock: &std::path::Path, mib: u64) -> Duration {
    let t = Instant::now();
    loop {
        let s = stats(sock);
        if s["actual_mib"] == mib {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the balloon did not reach {mib} MiB: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mem_total_kb(vm: &mut common::Running, tag: &str) -> u64 {
    let v = golden::shell(
        vm,
        tag,
        1,
        "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2",
    );
    v.parse().unwrap_or_else(|_| panic!("MemTotal: {v:?}"))
}

#[test]
fn a_patched_balloon_takes_memory_from_the_guest_and_gives_it_back() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("balloon");
    ns.add_tap("vmmtap11", None);
    let (mut vm, sock) = golden::restore(&ns, "vmmtap11", &g, "balloon");
    let (_, cfg) = curl(&sock, "GET", "/balloon", None);
    let before = mem_total_kb(&mut vm, "MEM0");
    // Statistics come every second.
    let t = Instant::now();
    let total = loop {
        let s = stats(&sock);
        if let Some(total) = s["total_memory"].as_u64() {
            break total;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no statistics: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let too_big = curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 4096}"#));
    assert_eq!(
        curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 32}"#)),
        (204, String::new())
    );
    let inflate = wait_actual(&sock, 32);
    let during = mem_total_kb(&mut vm, "MEM1");
    assert_eq!(
        curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#)),
        (204, String::new())
    );
    let deflate = wait_actual(&sock, 0);
    let after = mem_total_kb(&mut vm, "MEM2");
    let (_, cfg_after) = curl(&sock, "GET", "/balloon", None);
    let off = curl(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    eprintln!(
        "balloon: MemTotal {before} kB, {during} kB at 32 MiB (inflated in {inflate:?}), {after} kB after (deflated in {deflate:?}); guest total_memory {total}"
    );
    eprintln!("asserting: statistics with total_memory; 32 MiB inflate lowers MemTotal by 32768 kB and deflate restores it; a balloon over the guest's memory and turning statistics off are refused; GET /balloon follows the PATCHes; exit 0");
    assert!(
        total > 64 << 20 && total <= 128 << 20,
        "total_memory {total}"
    );
    assert_eq!(before - during, 32 * 1024);
    assert_eq!(after, before);
    assert_eq!(too_big.0, 400, "{}", too_big.1);
    assert!(
        too_big.1.contains("more than the guest's 128 MiB"),
        "{}",
        too_big.1
    );
    assert_eq!(off.0, 400, "{}", off.1);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["amount_mib"], 0);
    assert_eq!(cfg["stats_polling_interval_s"], 1);
    let cfg_after: serde_json::Value = serde_json::from_str(&cfg_after).unwrap();
    assert_eq!(cfg_after["amount_mib"], 0);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
