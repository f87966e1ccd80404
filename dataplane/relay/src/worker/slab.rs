//! A slab of connections addressed by generation-checked keys.
//!
//! A key is `index << 28 | generation` (below [`outrelay_io::USER_KEY_LIMIT`]): readiness or
//! a timer that fires for a connection already gone (its slot reused) carries an old
//! generation and finds nothing.

/// Bits of a key holding the generation.
const GENERATION_BITS: u32 = 28;
const GENERATION_MASK: u64 = (1 << GENERATION_BITS) - 1;
/// Slots beyond this are refused (keys must stay below bit 59, which marks listeners).
const MAX_SLOTS: usize = 1 << 30;

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Values by key, slots reused.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; `None` when the slab is full.
    pub(crate) fn insert(&mut self, value: T) -> Option<u64> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.entries.len() >= MAX_SLOTS {
                    return None;
                }
                self.entries.push(Entry {
                    generation: 0,
                    value: None,
                });
                u32::try_from(self.entries.len() - 1).ok()?
            }
        };
        let entry = self.entries.get_mut(index as usize)?;
        entry.value = Some(value);
        self.len += 1;
        Some(
            (u64::from(index) << GENERATION_BITS) | (u64::from(entry.generation) & GENERATION_MASK),
        )
    }

    fn entry(&self, key: u64) -> Option<&Entry<T>> {
        let index = usize::try_from(key >> GENERATION_BITS).ok()?;
        let entry = self.entries.get(index)?;
        (u64::from(entry.generation) & GENERATION_MASK == key & GENERATION_MASK).then_some(entry)
    }

    /// The value of `key`, if it is still there.
    pub(crate) fn get(&self, key: u64) -> Option<&T> {
        self.entry(key)?.value.as_ref()
    }

    /// The value of `key`, mutably.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        self.entry(key)?;
        let index = usize::try_from(key >> GENERATION_BITS).ok()?;
        self.entries.get_mut(index)?.value.as_mut()
    }

    /// Takes the value of `key` out; its slot is reused with the next generation.
    pub(crate) fn remove(&mut self, key: u64) -> Option<T> {
        self.entry(key)?;
        let index = usize::try_from(key >> GENERATION_BITS).ok()?;
        let entry = self.entries.get_mut(index)?;
        let value = entry.value.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(u32::try_from(index).ok()?);
        self.len -= 1;
        Some(value)
    }

    /// Values stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_does_not_answer_to_an_old_key() {
        let mut slab = Slab::default();
        let a = slab.insert("a").expect("room");
        assert_eq!(slab.get(a), Some(&"a"));
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b").expect("room");
        assert_ne!(a, b, "same slot, next generation");
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(slab.len(), 1);
        assert!(b < outrelay_io::USER_KEY_LIMIT);
    }
}
