//! A set of slots, one bit each: the heads changed since the last checkpoint. A list of them
//! cost 4 bytes per live flow until the next checkpoint, and a checkpoint reads the set once
//! (a word of 64 slots at a time, so a tick's cost still follows the table's slots / 64, not
//! its connections).

#[derive(Default)]
pub(super) struct SlotSet {
    words: Vec<u64>,
}

impl SlotSet {
    pub fn insert(&mut self, slot: u32) {
        let word = slot as usize / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (slot % 64);
    }

    /// The slots in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let base = index as u32 * 64;
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    base + bit
                })
            })
        })
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_listed_once_in_order_until_cleared() {
        let mut set = SlotSet::default();
        for slot in [130, 3, 64, 3, 63, 0] {
            set.insert(slot);
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 3, 63, 64, 130]);
        set.clear();
        assert_eq!(set.iter().count(), 0);
        set.insert(5);
        assert_eq!(set.iter().collect::<Vec<_>>(), [5]);
    }
}
