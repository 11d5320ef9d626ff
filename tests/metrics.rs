//! The metrics line against Firecracker 1.16's schema, from a real `vmm`:
//! nothing before the instance starts, the first line at InstanceStart (as
//! Firecracker writes it), and every line, that one, FlushMetrics' and the
//! one at exit, with exactly Firecracker's groups and fields, in its order,
//! per-device groups summing to their aggregate.

mod common;
#[path = "common/fc_metrics_schema.rs"]
mod schema;

use std::time::Duration;

use common::{curl, guest, tmp_path, vmm, wait_for_socket, Running};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Every line of the metrics file, parsed and checked against the schema.
fn lines(path: &std::path::Path) -> Vec<schema::Tree> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let line = schema::parse(l).unwrap();
            schema::validate(&line).unwrap_or_else(|e| panic!("{e}\n{l}"));
            line
        })
        .collect()
}

#[test]
fn lines_are_firecracker_1_16s_schema_from_the_instance_start_on() {
    let sock = tmp_path("metrics-schema.sock");
    let metrics = tmp_path("metrics-schema.ndjson");
    let uds = tmp_path("metrics-schema-v.sock");
    let disks = [
        tmp_path("metrics-schema-data.img"),
        tmp_path("metrics-schema-scratch.img"),
    ];
    for d in &disks {
        std::fs::write(d, vec![0u8; 64 * 1024]).unwrap();
    }
    let mut cmd = vmm();
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--metrics-path")
        .arg(&metrics);
    let mut vm = Running::start(cmd);
    wait_for_socket(&sock, &vm);
    let put = |path: &str, body: String| {
        let r = curl(&sock, "PUT", path, Some(&body));
        assert_eq!(r, (204, String::new()), "PUT {path} {body}");
    };
    put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            guest("virtio_blk").display()
        ),
    );
    for (id, d) in ["data", "scratch"].iter().zip(&disks) {
        put(
            &format!("/drives/{id}"),
            format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
                d.display()
            ),
        );
    }
    put(
        "/vsock",
        format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display()),
    );
    put("/entropy", "{}".into());
    put(
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": false}"#.into(),
    );
    let before_start = lines(&metrics);

    put("/actions", r#"{"action_type": "InstanceStart"}"#.into());
    // Written before the answer: there when the client hears of the start.
    let at_start = lines(&metrics);

    assert!(
        vm.wait_for("VMM-GUEST: flushed, halting", TIMEOUT),
        "{}",
        vm.stdout_now()
    );
    put("/actions", r#"{"action_type": "FlushMetrics"}"#.into());
    let flushed = lines(&metrics);
    vm.signal(libc::SIGTERM);
    let out = vm.finish(TIMEOUT);
    let all = lines(&metrics);

    eprintln!("asserting: no line before InstanceStart, one at it (counting the requests), one per FlushMetrics, one at exit; each Firecracker 1.16's schema; block = block_data + block_scratch; the guest's I/O on block_data");
    assert!(before_start.is_empty(), "{before_start:?}");
    assert_eq!(at_start.len(), 1, "{at_start:?}");
    let first = &at_start[0];
    assert_eq!(first.num("put_api_requests", "actions_count"), Some(1));
    assert_eq!(first.num("put_api_requests", "drive_count"), Some(2));
    assert_eq!(first.num("put_api_requests", "boot_source_count"), Some(1));
    assert_eq!(first.num("put_api_requests", "vsock_count"), Some(1));
    assert_eq!(flushed.len(), 2);
    assert_eq!(all.len(), 3, "{out:?}");
    for line in &all {
        for group in ["block", "net"] {
            let n = if group == "block" { 2 } else { 0 };
            schema::check_aggregate(line, group, n).unwrap();
        }
    }
    let sum = |group: &str, key: &str| -> u64 {
        all.iter()
            .map(|l| l.num(group, key).expect("the field"))
            .sum()
    };
    assert!(sum("block_data", "read_count") > 0);
    assert!(sum("block_data", "write_count") > 0);
    assert!(sum("block_data", "flush_count") > 0);
    assert_eq!(sum("block_scratch", "read_count"), 0);
    assert_eq!(
        sum("block", "write_bytes"),
        sum("block_data", "write_bytes")
    );
    assert_eq!(sum("put_api_requests", "actions_count"), 2);
    assert!(sum("uart", "write_count") > 0);
    for d in &disks {
        let _ = std::fs::remove_file(d);
    }
}
