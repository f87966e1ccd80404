//! User-space buffers, budgeted: where a direction's bytes go when no pipe can hold them.
//!
//! - **Copy buffers** (`copy_buffer_bytes` each, 16 KiB by default) come from
//!   `copy_budget_bytes`. A direction with data takes one only when the pipe budget is spent
//!   and moves its bytes with `recv`/`send` through it (HAProxy's fallback when `maxpipes` is
//!   reached), so a spent pipe budget slows new flows down instead of stopping them. It gives
//!   the buffer back when nothing is in flight, or as soon as a pipe could be had again.
//! - **Spill buffers** hold exactly what a stalled direction's pipe held when it gave the pipe
//!   back (see the engine's `stall_timeout`); they come from `spill_budget_bytes` and are freed
//!   as soon as the destination has taken them.
//!
//! Both budgets are per engine; nothing here is shared across threads.

/// Default size of one copy-path buffer, in bytes.
pub const DEFAULT_COPY_BUFFER_BYTES: usize = 16 * 1024;
/// Default total of copy-path buffers one engine may hold, in bytes (256 directions).
pub const DEFAULT_COPY_BUDGET_BYTES: usize = 4 * 1024 * 1024;
/// Default total of spilled bytes one engine may hold, in bytes.
pub const DEFAULT_SPILL_BUDGET_BYTES: usize = 8 * 1024 * 1024;
/// Idle copy buffers kept for reuse (not counted in the budget: they hold no bytes).
const COPY_POOL_MAX: usize = 16;

/// Limits of a [`BufferPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Total of copy buffers in use, in bytes; 0 turns the copy path off.
    pub copy_budget_bytes: usize,
    /// Size of one copy buffer, in bytes.
    pub copy_buffer_bytes: usize,
    /// Total of spilled bytes held, in bytes; 0 turns spilling off (stalled pipes are kept).
    pub spill_budget_bytes: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            copy_budget_bytes: DEFAULT_COPY_BUDGET_BYTES,
            copy_buffer_bytes: DEFAULT_COPY_BUFFER_BYTES,
            spill_budget_bytes: DEFAULT_SPILL_BUDGET_BYTES,
        }
    }
}

/// Counters of a [`BufferPool`] (read by the engine's stats).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    /// Bytes of copy buffers in use now.
    pub copy_held_bytes: usize,
    /// Directions on the copy path now.
    pub copy_active: usize,
    /// Times a direction took the copy path because the pipe budget was spent.
    pub copy_taken: u64,
    /// Copy buffers refused because the copy budget was spent too.
    pub copy_refusals: u64,
    /// Spilled bytes held now.
    pub spill_held_bytes: usize,
}

/// Which budget a [`Buf`] is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufKind {
    /// A copy-path buffer.
    Copy,
    /// The bytes of a stalled direction's pipe.
    Spill,
}

/// A buffer with a window of bytes waiting to be written (`start..end`).
#[derive(Debug)]
pub struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
    kind: BufKind,
}

impl Buf {
    /// Bytes waiting to be written.
    pub fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Whether no byte waits.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The budget it is charged to.
    pub fn kind(&self) -> BufKind {
        self.kind
    }

    /// The whole buffer to read into; only meaningful while empty (the window restarts at 0).
    pub fn space(&mut self) -> &mut [u8] {
        self.start = 0;
        self.end = 0;
        &mut self.data
    }

    /// `n` bytes were read into [`Buf::space`].
    pub fn filled(&mut self, n: usize) {
        self.start = 0;
        self.end = n.min(self.data.len());
    }

    /// `n` pending bytes were written.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

/// A per-engine buffer pool (not shared across threads: no locks).
#[derive(Debug)]
pub struct BufferPool {
    limits: BufferLimits,
    idle: Vec<Box<[u8]>>,
    stats: BufferStats,
}

impl BufferPool {
    /// An empty pool.
    pub fn new(limits: BufferLimits) -> BufferPool {
        BufferPool {
            limits,
            idle: Vec::new(),
            stats: BufferStats::default(),
        }
    }

    /// A copy buffer within the copy budget; `None` (counted) when it is spent.
    pub fn acquire_copy(&mut self) -> Option<Buf> {
        let size = self.limits.copy_buffer_bytes;
        if size == 0 || self.stats.copy_held_bytes + size > self.limits.copy_budget_bytes {
            self.stats.copy_refusals += 1;
            return None;
        }
        let data = self
            .idle
            .pop()
            .unwrap_or_else(|| vec![0u8; size].into_boxed_slice());
        self.stats.copy_held_bytes += size;
        self.stats.copy_active += 1;
        self.stats.copy_taken += 1;
        Some(Buf {
            data,
            start: 0,
            end: 0,
            kind: BufKind::Copy,
        })
    }

    /// Whether [`BufferPool::acquire_copy`] would succeed.
    pub fn has_copy_capacity(&self) -> bool {
        let size = self.limits.copy_buffer_bytes;
        size > 0 && self.stats.copy_held_bytes + size <= self.limits.copy_budget_bytes
    }

    /// An empty spill buffer of exactly `bytes` within the spill budget; `None` when it would
    /// overrun it (the caller counts).
    pub fn acquire_spill(&mut self, bytes: usize) -> Option<Buf> {
        if bytes == 0 || self.stats.spill_held_bytes + bytes > self.limits.spill_budget_bytes {
            return None;
        }
        self.stats.spill_held_bytes += bytes;
        Some(Buf {
            data: vec![0u8; bytes].into_boxed_slice(),
            start: 0,
            end: 0,
            kind: BufKind::Spill,
        })
    }

    /// Gives a buffer back to its budget (whatever it still holds is dropped).
    pub fn release(&mut self, buf: Buf) {
        match buf.kind {
            BufKind::Copy => {
                self.stats.copy_held_bytes -= buf.data.len();
                self.stats.copy_active -= 1;
                if self.idle.len() < COPY_POOL_MAX {
                    self.idle.push(buf.data);
                }
            }
            BufKind::Spill => self.stats.spill_held_bytes -= buf.data.len(),
        }
    }

    /// The pool's counters.
    pub fn stats(&self) -> BufferStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_bound_copy_and_spill_buffers() {
        let mut pool = BufferPool::new(BufferLimits {
            copy_budget_bytes: 32,
            copy_buffer_bytes: 16,
            spill_budget_bytes: 100,
        });
        let a = pool.acquire_copy().expect("first");
        let b = pool.acquire_copy().expect("second");
        assert!(pool.acquire_copy().is_none());
        assert!(!pool.has_copy_capacity());
        pool.release(a);
        assert!(pool.has_copy_capacity());
        let s = pool.acquire_spill(60).expect("spill");
        assert!(pool.acquire_spill(41).is_none());
        assert_eq!(pool.stats().spill_held_bytes, 60);
        pool.release(s);
        pool.release(b);
        let st = pool.stats();
        assert_eq!(
            (st.copy_held_bytes, st.copy_active, st.spill_held_bytes),
            (0, 0, 0)
        );
        assert_eq!((st.copy_taken, st.copy_refusals), (2, 1));
    }

    #[test]
    fn a_buffer_window_fills_and_drains() {
        let mut pool = BufferPool::new(BufferLimits::default());
        let mut b = pool.acquire_copy().expect("buffer");
        b.space()[..3].copy_from_slice(b"abc");
        b.filled(3);
        assert_eq!(b.pending(), b"abc");
        b.consume(2);
        assert_eq!(b.pending(), b"c");
        b.consume(5);
        assert!(b.is_empty());
        pool.release(b);
    }
}
