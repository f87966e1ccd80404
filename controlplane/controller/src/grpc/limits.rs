//! Connection caps on the gRPC TCP listener: a global cap, a per-source cap (an IPv4 address,
//! or an IPv6 /64 so one host cannot multiply itself by its address space) and a cap on
//! anonymous (no client certificate) connections, plus a per-source rate of new connections (a
//! token bucket checked at accept, before any TLS work, so a source that reconnects in a loop
//! costs an accept and a close, not a handshake). A slot is a guard: dropping the connection
//! gives it back. Counters are atomics and short-held map locks; no lock is held across I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::ConnLimits;
use crate::refusals::Refusal;

/// What a per-source cap counts: an IPv4 address or an IPv6 /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// One IPv4 address (IPv4-mapped IPv6 included).
    V4([u8; 4]),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix64([u8; 8]),
}

impl SourceKey {
    /// The source of `ip`.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    SourceKey::V6Prefix64([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// The listener's counters; shared by the accept loop and every connection's guards.
#[derive(Debug)]
pub struct Limits {
    caps: ConnLimits,
    open: AtomicUsize,
    anonymous: AtomicUsize,
    per_source: Mutex<HashMap<SourceKey, usize>>,
    rates: RateBuckets,
}

/// Token buckets per source: `rate` per second, burst twice that. Bounded to
/// [`RATE_SOURCES_MAX`] sources.
#[derive(Debug)]
pub struct RateBuckets {
    rate: f64,
    buckets: Mutex<HashMap<SourceKey, (f64, Instant)>>,
}

impl RateBuckets {
    /// Buckets refilling at `per_s` tokens per second.
    pub fn new(per_s: u32) -> RateBuckets {
        RateBuckets {
            rate: f64::from(per_s),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `source`'s bucket at `now`; false when it is empty.
    pub fn take(&self, source: SourceKey, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.rate * 2.0);
        let Ok(mut m) = self.buckets.lock() else {
            return true;
        };
        let level = |(tokens, at): (f64, Instant)| {
            (tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst)
        };
        if m.len() >= RATE_SOURCES_MAX && !m.contains_key(&source) {
            m.retain(|_, b| level(*b) < burst);
            if m.len() >= RATE_SOURCES_MAX {
                return true;
            }
        }
        let b = m.entry(source).or_insert((burst, now));
        let tokens = level(*b);
        if tokens < 1.0 {
            return false;
        }
        *b = (tokens - 1.0, now);
        true
    }
}

/// Most sources whose connection-rate buckets are tracked; beyond, full (idle) buckets are
/// forgotten, and a new source is let through uncounted if none is (the global cap still holds).
pub const RATE_SOURCES_MAX: usize = 65_536;

/// A connection slot (global and per source); released on drop.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<Limits>,
    source: SourceKey,
}

/// An anonymous-connection slot; released on drop.
#[derive(Debug)]
pub struct AnonSlot {
    limits: Arc<Limits>,
}

impl Limits {
    /// Counters for `caps`.
    pub fn new(caps: ConnLimits) -> Arc<Limits> {
        Arc::new(Limits {
            caps,
            open: AtomicUsize::new(0),
            anonymous: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            rates: RateBuckets::new(caps.new_connections_per_source_per_s),
        })
    }

    /// The caps.
    pub fn caps(&self) -> ConnLimits {
        self.caps
    }

    /// Takes a slot for a connection from `ip` accepted at `now`.
    ///
    /// # Errors
    /// [`Refusal::SourceRate`], [`Refusal::MaxConnections`] or [`Refusal::SourceConnections`]
    /// when a budget is spent.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<ConnSlot, Refusal> {
        let source = SourceKey::of(ip);
        if !self.take_rate(source, now) {
            return Err(Refusal::SourceRate);
        }
        if !take(&self.open, self.caps.max_connections) {
            return Err(Refusal::MaxConnections);
        }
        let admitted = match self.per_source.lock() {
            Ok(mut m) => {
                let n = m.entry(source).or_insert(0);
                if *n >= self.caps.max_per_source {
                    false
                } else {
                    *n += 1;
                    true
                }
            }
            Err(_) => false,
        };
        if !admitted {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::SourceConnections);
        }
        self.publish();
        Ok(ConnSlot {
            limits: self.clone(),
            source,
        })
    }

    /// Takes an anonymous slot.
    ///
    /// # Errors
    /// [`Refusal::AnonymousConnections`] when the cap is reached.
    pub fn admit_anonymous(self: &Arc<Self>) -> Result<AnonSlot, Refusal> {
        if !take(&self.anonymous, self.caps.max_anonymous) {
            return Err(Refusal::AnonymousConnections);
        }
        self.publish();
        Ok(AnonSlot {
            limits: self.clone(),
        })
    }

    fn take_rate(&self, source: SourceKey, now: Instant) -> bool {
        self.rates.take(source, now)
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn publish(&self) {
        let gauge = |v: usize| f64::from(u32::try_from(v).unwrap_or(u32::MAX));
        metrics::gauge!("outrelay_controller_connections", "kind" => "all")
            .set(gauge(self.open.load(Ordering::Relaxed)));
        metrics::gauge!("outrelay_controller_connections", "kind" => "anonymous")
            .set(gauge(self.anonymous.load(Ordering::Relaxed)));
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_source.lock()
            && let Some(n) = m.get_mut(&self.source)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        self.limits.publish();
    }
}

impl Drop for AnonSlot {
    fn drop(&mut self) {
        self.limits.anonymous.fetch_sub(1, Ordering::AcqRel);
        self.limits.publish();
    }
}

/// Increments `n` unless it already reached `max`.
fn take(n: &AtomicUsize, max: usize) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        (v < max).then_some(v + 1)
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> ConnLimits {
        ConnLimits {
            max_connections: 5,
            max_per_source: 2,
            max_anonymous: 1,
            anonymous_idle_timeout_ms: 1,
            anonymous_max_age_ms: 1,
            new_connections_per_source_per_s: 1000,
        }
    }

    #[test]
    fn caps_per_source_globally_and_for_anonymous_and_release_on_drop() {
        let l = Limits::new(caps());
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let s1 = l.admit(a, now).expect("1");
        let _s2 = l.admit(a, now).expect("2");
        assert_eq!(l.admit(a, now).err(), Some(Refusal::SourceConnections));
        // Same /64: same source.
        let v6a: IpAddr = "2001:db8::1".parse().expect("ip");
        let v6b: IpAddr = "2001:db8::ffff:1".parse().expect("ip");
        let _s3 = l.admit(v6a, now).expect("v6");
        let _s4 = l.admit(v6b, now).expect("v6 same /64");
        assert_eq!(l.admit(v6a, now).err(), Some(Refusal::SourceConnections));
        let _s5 = l.admit("10.0.0.2".parse().expect("ip"), now).expect("5");
        assert_eq!(
            l.admit("10.0.0.3".parse().expect("ip"), now).err(),
            Some(Refusal::MaxConnections)
        );
        drop(s1);
        assert_eq!(l.open(), 4);
        let _again = l.admit(a, now).expect("slot given back");
        let anon = l.admit_anonymous().expect("anon");
        assert_eq!(
            l.admit_anonymous().err(),
            Some(Refusal::AnonymousConnections)
        );
        drop(anon);
        l.admit_anonymous().expect("anon slot given back");
    }

    #[test]
    fn a_source_reconnecting_in_a_loop_is_rate_limited_and_refills() {
        let l = Limits::new(ConnLimits {
            new_connections_per_source_per_s: 10,
            ..caps()
        });
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut passed = 0;
        for _ in 0..100 {
            match l.admit(a, t0) {
                Ok(slot) => {
                    passed += 1;
                    drop(slot);
                }
                Err(why) => assert_eq!(why, Refusal::SourceRate),
            }
        }
        assert_eq!(passed, 20, "a burst of twice the rate");
        assert!(
            l.admit("10.0.0.2".parse().expect("ip"), t0).is_ok(),
            "other sources unaffected"
        );
        assert!(
            l.admit(a, t0 + std::time::Duration::from_millis(150))
                .is_ok(),
            "refilled"
        );
    }
}
