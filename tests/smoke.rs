//! CI smoke mode with the real binary and test guests: a pattern that
//! appears (exit 0, the report has its time), one that never does (the
//! timeout's status, the report names it), a guest that ends first, a guest
//! crash, and the console log.

mod common;

use std::time::{Duration, Instant};

use common::{guest, run, tmp_path, vmm};

fn report(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("the report was written");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn a_pattern_that_appears_passes_and_the_report_has_its_time() {
    let rep = tmp_path("smoke-pass.json");
    let log = tmp_path("smoke-pass.log");
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("counter"))
        .args([
            "--expect",
            r"count 0+3$",
            "--expect",
            "count 0+2",
            "--timeout",
            "30",
        ])
        .arg("--report")
        .arg(&rep)
        .arg("--console-log")
        .arg(&log);
    let out = run(cmd, Duration::from_secs(60));
    let r = report(&rep);
    eprintln!("asserting: exit 0, verdict pass, both patterns with times, timings present: {r:#}");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(r["verdict"], "pass");
    assert_eq!(r["exit_status"], 0);
    let p = r["patterns"].as_array().unwrap();
    assert!(p
        .iter()
        .all(|p| p["matched"] == true && p["matched_ms"].as_f64().unwrap() > 0.0));
    assert!(
        p[0]["matched_ms"].as_f64() >= p[1]["matched_ms"].as_f64(),
        "count 3 comes after count 2"
    );
    assert!(r["vmm_start_to_first_kvm_run_ms"].as_f64().unwrap() > 0.0);
    assert!(r["first_console_byte_ms"].as_f64().unwrap() > 0.0);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("VMM-GUEST: count 0000000000000003"),
        "{logged}"
    );
    assert!(
        out.stdout.contains("VMM-GUEST: count 0000000000000001"),
        "the console still shows"
    );
}

#[test]
fn a_pattern_that_never_appears_times_out_with_124_and_the_report_names_it() {
    let rep = tmp_path("smoke-timeout.json");
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("counter"))
        .args([
            "--expect",
            "count",
            "--expect",
            "never printed",
            "--timeout",
            "2",
        ])
        .arg("--report")
        .arg(&rep);
    let t = Instant::now();
    let out = run(cmd, Duration::from_secs(60));
    let took = t.elapsed();
    let r = report(&rep);
    eprintln!(
        "asserting: exit 124 after ~2 s ({took:?}), verdict timeout, 'never printed' unmatched"
    );
    assert_eq!(out.code, Some(124), "{}", out.stderr);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(r["verdict"], "timeout");
    assert_eq!(r["patterns"][0]["matched"], true);
    assert_eq!(r["patterns"][1]["matched"], false);
    assert!(r["patterns"][1]["matched_ms"].is_null());
    assert!(
        out.stderr.contains("'never printed' did not appear"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_guest_that_ends_first_or_crashes_fails_with_its_own_status() {
    let rep = tmp_path("smoke-ended.json");
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("acpi_poweroff"))
        .args(["--expect", "never printed", "--timeout", "30"])
        .arg("--report")
        .arg(&rep);
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code, Some(vmm::smoke::EXIT_NOT_SEEN), "{}", out.stderr);
    assert_eq!(report(&rep)["verdict"], "pattern-missing");
    assert_eq!(report(&rep)["guest_exit"]["kind"], "power_off");

    let rep = tmp_path("smoke-crash.json");
    let mut cmd = vmm();
    cmd.arg("--kernel")
        .arg(guest("triple_fault"))
        .args(["--expect", "never printed", "--timeout", "30"])
        .arg("--report")
        .arg(&rep);
    let out = run(cmd, Duration::from_secs(60));
    eprintln!(
        "asserting: a powered-off guest exits 4, a crashed one 3, each verdict in the report"
    );
    assert_eq!(out.code, Some(vmm::EXIT_GUEST_CRASH), "{}", out.stderr);
    let r = report(&rep);
    assert_eq!(r["verdict"], "crash");
    let exit = &r["guest_exit"];
    assert_eq!(exit["kind"], "crash", "{exit}");
    assert_eq!(exit["crash"], "triple_fault", "{exit}");
    assert_eq!(exit["vcpu"], 0, "{exit}");
    let rip = exit["rip"].as_str().unwrap_or_default();
    assert!(rip.starts_with("0x"), "RIP in hex: {exit}");
}

#[test]
fn a_bad_pattern_or_timeout_is_a_one_line_usage_error() {
    for (args, want) in [
        (
            &["--expect", "("][..],
            "--expect '(' is not a valid regular expression",
        ),
        (
            &["--timeout", "0"][..],
            "--timeout '0' is not a positive number",
        ),
    ] {
        let mut cmd = vmm();
        cmd.arg("--kernel").arg(guest("counter")).args(args);
        let out = run(cmd, Duration::from_secs(30));
        assert_eq!(out.code, Some(2), "{args:?}");
        assert!(
            out.stderr.contains(want) && out.stderr.lines().count() == 1,
            "{}",
            out.stderr
        );
    }
}
