//! Entries in fixed-size chunks, addressed by a stable `u32` slot: a table of 4-byte slots can
//! then index them (hashbrown's load factor applies to the slots, not to the entries), and
//! growing never copies an entry or allocates more than one chunk ahead.

/// Entries per chunk (a chunk of flow-table entries is ~180 KiB).
const CHUNK: usize = 1024;

/// A slot no entry has.
pub const NO_SLOT: u32 = u32::MAX;

pub struct Slab<T> {
    chunks: Vec<Vec<T>>,
    /// Slots whose entries were removed, to be used again.
    free: Vec<u32>,
}

impl<T: Default> Slab<T> {
    pub fn new() -> Self {
        Slab {
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Puts `entry` in a free slot; returns the slot.
    pub fn insert(&mut self, entry: T) -> u32 {
        if let Some(slot) = self.free.pop() {
            *self.get_mut(slot) = entry;
            return slot;
        }
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let slot = self.slots();
        assert!(slot < NO_SLOT, "fewer than 2^32 - 1 entries");
        self.chunks.last_mut().expect("pushed above").push(entry);
        slot
    }

    /// Takes the entry out of `slot`, leaving `T::default()` there, and frees the slot.
    pub fn remove(&mut self, slot: u32) -> T {
        self.free.push(slot);
        std::mem::take(self.get_mut(slot))
    }

    pub fn get(&self, slot: u32) -> &T {
        &self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut T {
        &mut self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    /// One past the highest slot ever used: every slot below it holds an entry or a default.
    pub fn slots(&self) -> u32 {
        let full = self.chunks.len().saturating_sub(1) * CHUNK;
        (full + self.chunks.last().map_or(0, Vec::len)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_reused() {
        let mut slab = Slab::new();
        let slots: Vec<u32> = (0..2 * CHUNK as u64 + 1).map(|i| slab.insert(i)).collect();
        assert_eq!(
            slots[CHUNK], CHUNK as u32,
            "the next chunk continues the count"
        );
        assert_eq!(slab.slots(), 2 * CHUNK as u32 + 1);
        assert_eq!(*slab.get(slots[CHUNK + 7]), CHUNK as u64 + 7);
        assert_eq!(slab.remove(5), 5);
        assert_eq!(*slab.get(5), 0, "a removed entry leaves a default");
        assert_eq!(slab.insert(99), 5, "a freed slot is used again");
        assert_eq!(*slab.get(5), 99);
        assert_eq!(slab.slots(), 2 * CHUNK as u32 + 1, "nothing grew");
        assert_eq!(
            slab.chunks.iter().map(Vec::capacity).collect::<Vec<_>>(),
            [CHUNK; 3],
            "no chunk grew past its size"
        );
    }
}
