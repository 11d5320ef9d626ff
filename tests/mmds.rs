//! The metadata service (MMDS) as Firecracker's users use it, on a clone of
//! the suite's golden Linux guest (whose `mmds-config` routes version 2 of
//! the service through eth0): the host fills the store over the API, the
//! guest's own tools (busybox nc and wget) ask for a session token and read
//! the store over HTTP at 169.254.169.254, a PATCH on the host is seen by the
//! next read, and a read without a token is refused with 401.

mod common;

use std::time::Duration;

use common::golden::{self, Netns};
use common::{curl, host, metric_sum, tmp_path};

const TOKEN: &str = "printf 'PUT /latest/api/token HTTP/1.1\\r\\nX-metadata-token-ttl-seconds: 60\\r\\nConnection: close\\r\\n\\r\\n' | nc 169.254.169.254 80 | tail -n 1";

/// A GET with the session token in `$T`: the whole response, CRs removed.
fn request(path: &str) -> String {
    format!(
        "printf \"GET {path} HTTP/1.1\\r\\nX-metadata-token: $T\\r\\nConnection: close\\r\\n\\r\\n\" | nc 169.254.169.254 80 | tr -d '\\r'"
    )
}

/// Its body, lines joined with commas.
fn get(path: &str) -> String {
    format!("{} | sed '1,/^$/d' | tr '\\n' ,", request(path))
}

#[test]
fn a_restored_guest_reads_the_store_with_a_session_token_and_sees_a_patch() {
    let host = host();
    let g = golden::golden(host);
    let ns = Netns::new("mmds");
    ns.add_tap("vmmtap9", Some(&format!("{}/24", golden::HOST_IP)));
    let metrics = tmp_path("mmds.metrics");
    let _ = std::fs::remove_file(&metrics);
    // The store is not part of a snapshot: the clone's is filled before the load.
    let data = r#"{"latest": {"meta-data": {"ami-id": "ami-12345678", "hostname": "clone-1"}}}"#;
    let before = [
        (
            "/metrics",
            format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
        ),
        ("/mmds", data.to_string()),
    ];
    let (mut vm, sock) = golden::restore_after(&ns, "vmmtap9", &g, "mmds", &before);
    let (code, body) = curl(&sock, "GET", "/mmds", None);
    assert_eq!(code, 200);
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got["latest"]["meta-data"]["hostname"], "clone-1");

    vm.type_on_console(&format!("T=$({TOKEN})\n"));
    let token = golden::shell(&mut vm, "TOK", 1, "echo $T");
    let ami = golden::shell(&mut vm, "AMI", 2, &get("/latest/meta-data/ami-id"));
    let listing = golden::shell(&mut vm, "LIST", 3, &get("/latest/meta-data/"));
    let patch = r#"{"latest": {"meta-data": {"hostname": "renamed", "ami-id": null}}}"#;
    assert_eq!(
        curl(&sock, "PATCH", "/mmds", Some(patch)),
        (204, String::new())
    );
    let renamed = golden::shell(&mut vm, "HOST", 4, &get("/latest/meta-data/hostname"));
    let gone = golden::shell(
        &mut vm,
        "GONE",
        5,
        &format!("{} | head -n 1", request("/latest/meta-data/ami-id")),
    );
    let refused = golden::shell(
        &mut vm,
        "NOTOKEN",
        6,
        "wget -q -O - http://169.254.169.254/latest/ 2>&1",
    );
    // The pre-boot-only configuration cannot change on a running VM.
    let (late, _) = curl(
        &sock,
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"]}"#),
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(curl(&sock, "PUT", "/actions", Some(flush)).0, 204);
    vm.type_on_console("poweroff -f\n");
    let outcome = vm.finish(Duration::from_secs(120));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let sum = |key: &str| metric_sum(&metrics, "mmds", key);
    eprintln!("asserting: a 64-hex-digit token; ami-id and the key listing as stored; the PATCHed hostname; 404 for the removed key; 401 without a token; PUT /mmds/config refused after the start; mmds metrics; exit 0");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "token {token:?}"
    );
    // (Whether sed ends the body's last line with a newline is its business.)
    let body = |s: &str| s.trim_end_matches(',').to_string();
    assert_eq!(body(&ami), "ami-12345678");
    assert_eq!(body(&listing), "ami-id,hostname");
    assert_eq!(body(&renamed), "renamed");
    assert_eq!(gone, "HTTP/1.1 404 Not Found");
    assert!(refused.contains("401"), "{refused}");
    assert_eq!(late, 400);
    assert!(sum("connections_created") >= 6, "{text}");
    assert!(sum("tx_count") >= 6, "{text}");
    assert!(sum("rx_accepted") > 0, "{text}");
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
