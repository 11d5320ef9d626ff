//! Token-bucket rate limiting of a device's I/O, with Firecracker's model: a
//! limiter has up to two buckets, one counting bytes and one counting
//! operations. A bucket holds `size` tokens, refills from empty to full in
//! `refill_time` milliseconds, and may start with `one_time_burst` extra
//! tokens that are spent first and never come back. An operation goes ahead
//! only when every bucket can pay for it; otherwise the device leaves it where
//! it is (in the guest's ring, or in the TAP) and asks to be called again when
//! the buckets will have refilled enough ([`RateLimiter::wait`]).
//!
//! The limiter holds no descriptor: the transport owns the timer that wakes the
//! device, so the model is plain arithmetic over [`Instant`]s and tests can
//! drive its clock.

use std::time::{Duration, Instant};

/// How one bucket is configured (Firecracker's `TokenBucket` object).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens at the start, spent before the bucket's own.
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// A bucket of size 0 or refill time 0 limits nothing (Firecracker's rule).
    pub fn limits(&self) -> bool {
        self.size != 0 && self.refill_time_ms != 0
    }
}

/// One token bucket. Its level is kept in token-nanoseconds (tokens ×
/// refill time in ns) so that refilling by elapsed nanoseconds × size is exact
/// integer arithmetic with no drift. The level may go below zero: an
/// operation larger than the bucket is let through when the bucket is full,
/// and a received frame (whose size is known only once read) is paid for
/// after the fact; the debt is repaid by refilling before anything else goes.
#[derive(Clone, Debug)]
struct Bucket {
    size: u64,
    refill_ns: u128,
    burst: u64,
    level: i128,
    last: Instant,
}

impl Bucket {
    fn new(cfg: BucketConfig, now: Instant) -> Option<Bucket> {
        if !cfg.limits() {
            return None;
        }
        let refill_ns = u128::from(cfg.refill_time_ms) * 1_000_000;
        Some(Bucket {
            size: cfg.size,
            refill_ns,
            burst: cfg.one_time_burst,
            level: Self::scaled(cfg.size, refill_ns),
            last: now,
        })
    }

    fn scaled(tokens: u64, refill_ns: u128) -> i128 {
        // u64 × (u64 ms × 1e6) < 2^64 × 2^84: fits an i128 only with care, so
        // saturate (a bucket that large is unlimited in practice).
        i128::try_from(u128::from(tokens).saturating_mul(refill_ns)).unwrap_or(i128::MAX / 4)
    }

    fn full(&self) -> i128 {
        Self::scaled(self.size, self.refill_ns)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let gain =
            i128::try_from(elapsed.saturating_mul(u128::from(self.size))).unwrap_or(i128::MAX / 4);
        self.level = self.level.saturating_add(gain).min(self.full());
    }

    /// Tokens still owed by the bucket itself once the burst has paid what it can.
    fn after_burst(&self, tokens: u64) -> u64 {
        tokens.saturating_sub(self.burst)
    }

    /// Whether `tokens` can be paid now (refill first). A request above the
    /// bucket's size needs a full bucket.
    fn can_pay(&self, tokens: u64) -> bool {
        let own = self.after_burst(tokens);
        own == 0 || self.level >= Self::scaled(own.min(self.size), self.refill_ns)
    }

    /// Pays `tokens`, the burst first; the level may go negative.
    fn pay(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let own = tokens - from_burst;
        self.level = self.level.saturating_sub(Self::scaled(own, self.refill_ns));
    }

    /// Time until `tokens` can be paid (zero if now).
    fn time_to_pay(&self, tokens: u64) -> Duration {
        let own = self.after_burst(tokens);
        if own == 0 {
            return Duration::ZERO;
        }
        let need = Self::scaled(own.min(self.size), self.refill_ns) - self.level;
        if need <= 0 {
            return Duration::ZERO;
        }
        // Each nanosecond adds `size` token-nanoseconds; round up.
        let ns = (need as u128).div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// A device's limiter for one direction of I/O: bytes and operations.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    /// What the last refused operation asked for (ops, bytes): the wait is
    /// computed for it.
    refused: Option<(u64, u64)>,
    /// Operations refused so far (Firecracker's `rate_limiter_throttled_events`).
    throttled: u64,
}

impl RateLimiter {
    /// A limiter with these buckets (`None`, or a bucket of size 0 or refill
    /// time 0, limits nothing), full at `now`.
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>, now: Instant) -> Self {
        RateLimiter {
            bandwidth: bandwidth.and_then(|c| Bucket::new(c, now)),
            ops: ops.and_then(|c| Bucket::new(c, now)),
            refused: None,
            throttled: 0,
        }
    }

    /// Whether any bucket limits anything.
    pub fn limits(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Replaces the buckets named in an update (Firecracker's PATCH): for each,
    /// `None` keeps the bucket as it is, `Some(cfg)` puts in a new full bucket
    /// (or none, for a bucket that limits nothing). The refused-operation
    /// count carries over.
    pub fn update(
        &mut self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        now: Instant,
    ) {
        if let Some(c) = bandwidth {
            self.bandwidth = Bucket::new(c, now);
        }
        if let Some(c) = ops {
            self.ops = Bucket::new(c, now);
        }
        self.refused = None;
    }

    fn refill(&mut self, now: Instant) {
        for b in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            b.refill(now);
        }
    }

    /// Pays for `ops` operations moving `bytes` bytes if every bucket can,
    /// else pays nothing, remembers the request for [`RateLimiter::wait`] and
    /// returns false.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        // Without a bucket nothing is paid, and the clock is not read.
        !self.limits() || self.consume_at(ops, bytes, Instant::now())
    }

    /// [`RateLimiter::consume`] at `now`.
    pub fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if !self.limits() {
            return true;
        }
        self.refill(now);
        let ok = self.bandwidth.as_ref().is_none_or(|b| b.can_pay(bytes))
            && self.ops.as_ref().is_none_or(|b| b.can_pay(ops));
        if ok {
            self.pay(ops, bytes);
            self.refused = None;
        } else {
            self.refused = Some((ops, bytes));
            self.throttled += 1;
        }
        ok
    }

    /// Whether an operation of unknown size may start now: one operation and
    /// one byte can be paid. (A received frame is read first and paid for
    /// with [`RateLimiter::pay_after`].) Remembers a refusal like `consume`.
    pub fn may_start(&mut self) -> bool {
        !self.limits() || self.may_start_at(Instant::now())
    }

    /// [`RateLimiter::may_start`] at `now`.
    pub fn may_start_at(&mut self, now: Instant) -> bool {
        if !self.limits() {
            return true;
        }
        self.refill(now);
        let ok = self.bandwidth.as_ref().is_none_or(|b| b.can_pay(1))
            && self.ops.as_ref().is_none_or(|b| b.can_pay(1));
        if ok {
            self.refused = None;
        } else {
            self.refused = Some((1, 1));
            self.throttled += 1;
        }
        ok
    }

    /// Pays for an operation already done, even into debt.
    pub fn pay_after(&mut self, ops: u64, bytes: u64) {
        if self.limits() {
            self.pay_after_at(ops, bytes, Instant::now());
        }
    }

    /// [`RateLimiter::pay_after`] at `now`.
    pub fn pay_after_at(&mut self, ops: u64, bytes: u64, now: Instant) {
        if self.limits() {
            self.refill(now);
            self.pay(ops, bytes);
        }
    }

    fn pay(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.pay(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.pay(ops);
        }
    }

    /// How long after `now` the last refused operation could go ahead, if
    /// one was refused since the last success.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let (ops, bytes) = self.refused?;
        let mut probe = self.clone();
        probe.refill(now);
        let t = [
            probe.bandwidth.as_ref().map(|b| b.time_to_pay(bytes)),
            probe.ops.as_ref().map(|b| b.time_to_pay(ops)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO);
        Some(t)
    }

    /// Operations refused so far.
    pub fn throttled_events(&self) -> u64 {
        self.throttled
    }
}

/// The earlier of two optional waits.
pub fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms,
        })
    }

    #[test]
    fn no_bucket_or_an_empty_one_limits_nothing() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(None, bucket(0, 100), t0);
        assert!(!l.limits());
        assert!(l.consume_at(u64::MAX, u64::MAX, t0));
        let mut l = RateLimiter::new(bucket(100, 0), None, t0);
        assert!(!l.limits());
        assert!(l.consume_at(1, 1 << 40, t0));
        assert_eq!(l.wait(t0), None);
    }

    #[test]
    fn ops_are_paid_then_refused_then_refill_at_the_configured_rate() {
        let t0 = Instant::now();
        // 10 operations per 1000 ms.
        let mut l = RateLimiter::new(None, bucket(10, 1000), t0);
        for _ in 0..10 {
            assert!(l.consume_at(1, 4096, t0));
        }
        assert!(!l.consume_at(1, 4096, t0));
        assert_eq!(l.throttled_events(), 1);
        // One token comes back every 100 ms.
        assert_eq!(l.wait(t0), Some(ms(100)));
        assert!(!l.consume_at(1, 0, t0 + ms(99)));
        assert!(l.consume_at(1, 0, t0 + ms(100)));
        // After a long idle time the bucket is full, never fuller.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(l.consume_at(1, 0, later));
        }
        assert!(!l.consume_at(1, 0, later));
    }

    #[test]
    fn both_buckets_must_pay_and_a_refusal_pays_nothing() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(1000, 1000), bucket(100, 1000), t0);
        assert!(l.consume_at(1, 900, t0));
        // Bytes cannot pay 200: the operation bucket is not charged either.
        assert!(!l.consume_at(1, 200, t0));
        assert_eq!(l.wait(t0), Some(ms(100)));
        assert!(l.consume_at(1, 100, t0));
        let mut ops_left = 0;
        while l.consume_at(1, 0, t0) {
            ops_left += 1;
        }
        assert_eq!(ops_left, 98);
    }

    #[test]
    fn the_burst_is_spent_first_and_never_returns() {
        let t0 = Instant::now();
        let cfg = BucketConfig {
            size: 100,
            one_time_burst: 500,
            refill_time_ms: 100,
        };
        let mut l = RateLimiter::new(Some(cfg), None, t0);
        assert!(l.consume_at(1, 550, t0));
        assert!(l.consume_at(1, 50, t0));
        assert!(!l.consume_at(1, 1, t0));
        // A long rest refills the bucket to its size only.
        let later = t0 + Duration::from_secs(10);
        assert!(l.consume_at(1, 100, later));
        assert!(!l.consume_at(1, 1, later));
    }

    #[test]
    fn a_request_larger_than_the_bucket_needs_a_full_bucket_and_leaves_a_debt() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(1000, 100), None, t0);
        assert!(l.consume_at(1, 1, t0));
        assert!(!l.consume_at(1, 5000, t0));
        // Full again 0.1 ms after one byte was spent.
        assert!(l.consume_at(1, 5000, t0 + ms(1)));
        // Owes 4000 bytes: nothing goes until 4000 + 1 byte refill (400.1 ms).
        assert!(!l.consume_at(1, 1, t0 + ms(400)));
        assert!(l.consume_at(1, 1, t0 + ms(402)));
    }

    #[test]
    fn frames_of_unknown_size_start_when_a_token_is_there_and_are_paid_after() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(1500, 1000), None, t0);
        assert!(l.may_start_at(t0));
        l.pay_after_at(1, 3000, t0);
        assert!(!l.may_start_at(t0));
        // 1500 bytes of debt and one more byte: 1000.67 ms at 1.5 bytes/ms.
        let w = l.wait(t0).expect("refused");
        assert!(w > ms(1000) && w < ms(1002), "{w:?}");
        assert!(l.may_start_at(t0 + w));
    }

    #[test]
    fn the_long_run_rate_is_the_configured_one() {
        // 1 MiB per 100 ms = 10 MiB/s, moved in 64 KiB operations as fast as
        // the limiter lets them go: 5 simulated seconds move ~50 MiB.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(1 << 20, 100), None, t0);
        let mut now = t0;
        let mut moved: u64 = 0;
        while now < t0 + Duration::from_secs(5) {
            if l.consume_at(1, 64 << 10, now) {
                moved += 64 << 10;
            } else {
                now += l.wait(now).expect("refused");
            }
        }
        let mib = moved as f64 / f64::from(1 << 20);
        // The first full bucket (1 MiB) comes free.
        assert!((50.0..=51.1).contains(&mib), "{mib} MiB");
    }

    #[test]
    fn an_update_replaces_only_the_named_buckets() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(10, 1000), bucket(1, 1000), t0);
        assert!(l.consume_at(1, 10, t0));
        assert!(!l.consume_at(1, 1, t0));
        // A new bandwidth bucket (full); the spent ops bucket stays.
        l.update(bucket(100, 1000), None, t0);
        assert!(!l.consume_at(1, 1, t0));
        // Disabling the ops bucket lets the bandwidth bucket alone decide.
        l.update(None, bucket(0, 0), t0);
        assert!(l.consume_at(1, 100, t0));
        assert!(!l.consume_at(1, 1, t0));
        assert_eq!(l.throttled_events(), 3);
    }

    #[test]
    fn huge_settings_do_not_overflow() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(bucket(u64::MAX, u64::MAX), bucket(u64::MAX, 1), t0);
        assert!(l.consume_at(u64::MAX, u64::MAX, t0));
        assert!(l.consume_at(1, 1, t0 + Duration::from_secs(1 << 30)));
        let _ = l.wait(t0);
    }
}
