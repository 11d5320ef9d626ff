//! Guest frames to the metadata service's endpoint: the input is cut into
//! frames (two length bytes each). A frame whose first byte is odd is sent
//! as it is (any Ethernet frame, ARP or not); the others get a valid
//! Ethernet and IPv4 header to the service's address with the fuzz bytes as
//! the TCP segment, so sequence numbers, flags, options, windows and HTTP
//! requests are the guest's. The endpoint must never panic or hold more
//! than its bounds, and every frame it sends back must be well formed.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::mmds::stack::{MmdsStack, MAX_CONNECTIONS, MAX_QUEUED_FRAMES};
use devices::mmds::{Mmds, Version};
use libfuzzer_sys::fuzz_target;

const SVC: [u8; 4] = [169, 254, 169, 254];

fn frame(chunk: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = chunk.split_first() else {
        return Vec::new();
    };
    if mode & 1 == 1 {
        return rest.to_vec();
    }
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    let total = (20 + rest.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2]);
    f.extend_from_slice(&SVC);
    f.extend_from_slice(rest);
    f
}

fuzz_target!(|data: &[u8]| {
    let mut m = Mmds::new(4096);
    m.configure(
        if data.first().is_some_and(|b| b & 0x80 != 0) {
            Version::V2
        } else {
            Version::V1
        },
        false,
    );
    m.put(serde_json::json!({"latest": {"meta-data": {"a": "b", "big": "x".repeat(3000)}}}))
        .unwrap();
    let mut stack = MmdsStack::new(SVC, Arc::new(Mutex::new(m)));
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % 2048;
        let chunk = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        let f = frame(chunk);
        let _ = stack.may_want(&f);
        stack.detour(&f);
        // Drain half the time, so that the queue also fills.
        if len % 2 == 0 {
            while let Some(out) = stack.pop_frame() {
                assert!(
                    out.len() >= 14 && out.len() <= 14 + 20 + 24 + 1460,
                    "{}",
                    out.len()
                );
            }
        }
        assert!(stack.connections() <= MAX_CONNECTIONS);
        assert!(stack.queued() <= MAX_QUEUED_FRAMES);
    }
});
