//! The microVM metadata service (MMDS), with Firecracker's semantics: a JSON
//! data store the host fills over the API (`PUT`/`PATCH /mmds`) and the guest
//! reads over HTTP at a link-local address (169.254.169.254 by default),
//! through a network interface the host chose. Version 1 answers any GET;
//! version 2 asks for a session token first (`PUT /latest/api/token`), as
//! EC2's IMDSv2 does.
//!
//! [`Mmds`] is the data store and the guest-facing HTTP logic ([`http`]);
//! [`stack::MmdsStack`] is the small ARP/IPv4/TCP endpoint a network device
//! puts in front of its TAP to catch the guest's requests.

pub mod http;
pub mod stack;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Errors of the data store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A PUT or PATCH would make the store larger than its limit.
    #[error("The MMDS patch request doesn't fit. The data store would be {size} bytes, over its limit of {limit} bytes; store less, or raise --mmds-size-limit.")]
    TooLarge {
        /// Bytes the store would take, as JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// PATCH before any PUT.
    #[error("The MMDS data store is not initialized; PUT /mmds first.")]
    NotInitialized,
}

/// How the guest talks to the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Version {
    /// GET needs no token (Firecracker's default, deprecated there).
    #[default]
    V1,
    /// GET needs a session token from `PUT /latest/api/token`.
    V2,
}

/// Live session tokens at most; the oldest goes first when a new one would
/// exceed it (a guest cannot make the VMM keep an unbounded table).
const MAX_TOKENS: usize = 1024;
/// Longest token lifetime a guest may ask for (6 hours), as in Firecracker.
pub const MAX_TOKEN_TTL_SECS: u64 = 21_600;

/// The data store and its guest-facing settings, shared by the API and the
/// network devices that serve it.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    limit: usize,
    version: Version,
    imds_compat: bool,
    tokens: HashMap<String, Instant>,
    /// Counters under Firecracker's `mmds` metric names.
    pub counters: MmdsCounters,
}

/// What the service has done, for the `mmds` metrics group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmdsCounters {
    /// Frames from the guest the stack took.
    pub rx_accepted: u64,
    /// Frames it took but could not make sense of.
    pub rx_accepted_err: u64,
    /// Frames addressed to it that it dropped (not TCP to port 80, fragments).
    pub rx_accepted_unusual: u64,
    /// Frames it looked at.
    pub rx_count: u64,
    /// Bytes of frames it sent to the guest.
    pub tx_bytes: u64,
    /// HTTP responses it sent.
    pub tx_count: u64,
    /// Frames it sent.
    pub tx_frames: u64,
    /// Frames it could not send (queue full).
    pub tx_errors: u64,
    /// TCP connections opened.
    pub connections_created: u64,
    /// TCP connections closed or evicted.
    pub connections_destroyed: u64,
    /// GETs (version 1) without a token.
    pub rx_no_token: u64,
    /// GETs (version 1) with a token that is not valid.
    pub rx_invalid_token: u64,
}

/// The store shared between the API thread's requests and the devices.
pub type SharedMmds = Arc<Mutex<Mmds>>;

impl Mmds {
    /// An empty, uninitialized store of at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Mmds {
            data: Value::Null,
            initialized: false,
            limit,
            version: Version::V1,
            imds_compat: false,
            tokens: HashMap::new(),
            counters: MmdsCounters::default(),
        }
    }

    /// Sets how the guest talks to the service.
    pub fn configure(&mut self, version: Version, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    /// Replaces the whole store.
    pub fn put(&mut self, data: Value) -> Result<(), Error> {
        self.check_size(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7396) to the store, whole or not at all.
    pub fn patch(&mut self, patch: &Value) -> Result<(), Error> {
        if !self.initialized {
            return Err(Error::NotInitialized);
        }
        let mut next = self.data.clone();
        merge_patch(&mut next, patch);
        self.check_size(&next)?;
        self.data = next;
        Ok(())
    }

    /// Whether a PUT filled the store.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// The store's contents (null before the first PUT).
    pub fn data(&self) -> &Value {
        &self.data
    }

    fn check_size(&self, v: &Value) -> Result<(), Error> {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        if size > self.limit {
            return Err(Error::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// A new session token valid for `ttl`, or None if no randomness could be had.
    fn new_token(&mut self, ttl: Duration, now: Instant) -> Option<String> {
        let mut raw = [0u8; 32];
        let mut filled = 0;
        while filled < raw.len() {
            // SAFETY: getrandom writes at most the given length into the
            // given buffer, which is ours and that long.
            let n = unsafe {
                libc::getrandom(raw[filled..].as_mut_ptr().cast(), raw.len() - filled, 0)
            };
            if n <= 0 {
                return None;
            }
            filled += n as usize;
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .tokens
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(t, _)| t.clone())
            {
                self.tokens.remove(&oldest);
            }
        }
        self.tokens.insert(token.clone(), now + ttl);
        Some(token)
    }

    fn token_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|e| *e > now)
    }
}

/// RFC 7396: an object patch merges key by key (null removes a key);
/// anything else replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_replaces_patch_merges_and_both_keep_the_limit() {
        let mut m = Mmds::new(64);
        assert_eq!(m.patch(&json!({"a": 1})), Err(Error::NotInitialized));
        m.put(json!({"a": {"b": 1, "c": 2}, "d": "x"})).unwrap();
        m.patch(&json!({"a": {"b": null, "e": [1]}, "d": "y"}))
            .unwrap();
        assert_eq!(m.data(), &json!({"a": {"c": 2, "e": [1]}, "d": "y"}));
        let big = json!({"k": "v".repeat(100)});
        assert!(matches!(m.put(big.clone()), Err(Error::TooLarge { .. })));
        assert!(matches!(m.patch(&big), Err(Error::TooLarge { .. })));
        // Unchanged by the refused requests.
        assert_eq!(m.data()["d"], "y");
        // A non-object patch replaces the whole store.
        m.patch(&json!("s")).unwrap();
        assert_eq!(m.data(), &json!("s"));
    }

    #[test]
    fn tokens_expire_and_their_table_is_bounded() {
        let mut m = Mmds::new(1024);
        let t0 = Instant::now();
        let tok = m.new_token(Duration::from_secs(10), t0).unwrap();
        assert_eq!(tok.len(), 64);
        assert!(m.token_valid(&tok, t0 + Duration::from_secs(9)));
        assert!(!m.token_valid(&tok, t0 + Duration::from_secs(10)));
        assert!(!m.token_valid("forged", t0));
        for _ in 0..MAX_TOKENS + 10 {
            m.new_token(Duration::from_secs(100), t0).unwrap();
        }
        assert!(m.tokens.len() <= MAX_TOKENS);
    }
}
