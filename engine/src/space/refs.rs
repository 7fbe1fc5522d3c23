//! Reference counts of block ids, one byte each (issue 22, docs/design/paged-metadata.md §5):
//! the per-block state that stays in RAM once the block table is paged. Like dm-vdo's slab
//! reference counts, a byte holds the usual counts and a side map the rare large ones.
//!
//! | byte | meaning |
//! |---:|---|
//! | 0 | free: the allocator may hand the id out |
//! | 1..=253 | exactly that many map entries point at the block |
//! | 254 | 254 or more: the count is in `overflow` |
//! | 255 | held, no reference: handed out and not referenced yet, or dead and waiting for a checkpoint to cover its death before it is reused |
//!
//! Free ids are found by scanning the bytes for 0 from the lowest one released (`cursor`): no
//! list of free ids (8 bytes each), and the lowest ids are reused first, so the arrays stay
//! near the live high-water mark.

use std::collections::HashMap;
use std::sync::Arc;

use super::blocks::Chunked;

/// The byte of a count kept in `overflow`.
const OVERFLOW: u8 = 254;

/// The byte of an id held with no reference (see the module's table).
const HELD: u8 = 255;

/// Reference counts by block id, copied on write by chunk like the block table (a checkpoint's
/// image clones them inside its pause).
#[derive(Clone, Default)]
pub struct RefCounts {
    bytes: Chunked<u8>,
    /// Counts of 254 and more. Shared with images like the chunks, copied at its first change.
    overflow: Arc<HashMap<u64, u32>>,
    /// No free id lies below it (ids from 1).
    cursor: usize,
}

impl std::fmt::Debug for RefCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefCounts")
            .field("ids", &self.bytes.len())
            .field("overflowed", &self.overflow.len())
            .finish()
    }
}

impl RefCounts {
    /// A copy for a checkpoint's image, which asks only whether an id is live: the byte chunks
    /// are shared (copied on write), the side map is left out. Sharing it would make the first
    /// change to any count of 254 or more after each checkpoint copy the whole map under the
    /// space lock (every block of a volume with 254 snapshots is in it).
    pub fn liveness(&self) -> RefCounts {
        RefCounts {
            bytes: self.bytes.clone(),
            overflow: Arc::default(),
            cursor: 0,
        }
    }

    /// `n` ids, all free.
    pub fn with_len(n: usize) -> RefCounts {
        let mut r = RefCounts::default();
        r.grow_to(n);
        r
    }

    /// Grow to `n` ids (never shrinks); the new ones are free.
    pub fn grow_to(&mut self, n: usize) {
        self.bytes.grow_to(n, 0);
    }

    /// References to `id` (0 for a free or held id, or one beyond the table).
    pub fn get(&self, id: u64) -> u32 {
        match self.bytes.get(id as usize) {
            None | Some(&HELD) => 0,
            Some(&OVERFLOW) => self
                .overflow
                .get(&id)
                .copied()
                .unwrap_or(u32::from(OVERFLOW)),
            Some(&b) => u32::from(b),
        }
    }

    /// Units of [`super::blocks::CHANGE_UNIT`] ids whose bytes changed since the last call.
    pub fn take_changed(&mut self) -> Vec<usize> {
        self.bytes.take_changed()
    }

    /// Whether `id` is referenced.
    pub fn live(&self, id: u64) -> bool {
        self.bytes
            .get(id as usize)
            .is_some_and(|&b| b != 0 && b != HELD)
    }

    /// Whether `id` is free (released, or never handed out).
    pub fn is_free(&self, id: u64) -> bool {
        self.bytes.get(id as usize) == Some(&0)
    }

    /// Whether each id is live, in id order.
    pub fn live_iter(&self) -> impl Iterator<Item = bool> + '_ {
        self.bytes.iter().map(|&b| b != 0 && b != HELD)
    }

    /// Whether `id` is held: handed out or dead, with no reference, not reusable yet.
    #[cfg(test)]
    fn held(&self, id: u64) -> bool {
        self.bytes.get(id as usize) == Some(&HELD)
    }

    /// Hand out the lowest free id (held from now on), or `None` when every id is taken.
    pub fn take_free(&mut self) -> Option<u64> {
        let Some(i) = self.bytes.find_from(self.cursor.max(1), 0) else {
            // None below the end: the next search starts at ids added since.
            self.cursor = self.bytes.len();
            return None;
        };
        self.cursor = i + 1;
        *self.bytes.get_mut(i)? = HELD;
        Some(i as u64)
    }

    /// Hold `id` (a new id, or one replay placed).
    pub fn hold(&mut self, id: u64) {
        if let Some(b) = self.bytes.get_mut(id as usize) {
            if *b == 0 {
                *b = HELD;
            }
        }
    }

    /// Make a held id free again (a checkpoint covers its death); `false` if it is not held
    /// (referenced again meanwhile, or released already).
    pub fn release(&mut self, id: u64) -> bool {
        match self.bytes.get_mut(id as usize) {
            Some(b) if *b == HELD => {
                *b = 0;
                self.cursor = self.cursor.min(id as usize);
                true
            }
            _ => false,
        }
    }

    /// Free every held id (after a checkpoint that covers everything).
    pub fn release_all(&mut self) {
        let mut from = 1;
        while let Some(i) = self.bytes.find_from(from, HELD) {
            if let Some(b) = self.bytes.get_mut(i) {
                *b = 0;
            }
            from = i + 1;
        }
        self.cursor = 1;
    }

    /// One more reference; the count after it, or `None` for an id beyond the table. A count
    /// at `u32::MAX` stays there and the block is never freed: a leak of one block, reached
    /// only by 4 billion map entries on one block (snapshots of terabytes of one repeated
    /// block).
    pub fn add(&mut self, id: u64) -> Option<u32> {
        let b = self.bytes.get_mut(id as usize)?;
        if *b == HELD {
            *b = 0;
        }
        if *b < OVERFLOW - 1 {
            *b += 1;
            return Some(u32::from(*b));
        }
        let overflow = Arc::make_mut(&mut self.overflow);
        if *b == OVERFLOW - 1 {
            *b = OVERFLOW;
            overflow.insert(id, u32::from(OVERFLOW));
            return Some(u32::from(OVERFLOW));
        }
        let c = overflow.entry(id).or_insert(u32::from(OVERFLOW));
        *c = c.saturating_add(1);
        Some(*c)
    }

    /// One reference less; the count after it, or `None` when nothing was dropped: a free or
    /// held id, one beyond the table, or a count stuck at `u32::MAX` (see [`RefCounts::add`]).
    /// An id whose last reference goes is held, not free: the caller releases it once a
    /// checkpoint covers its death.
    pub fn drop_one(&mut self, id: u64) -> Option<u32> {
        let cur = self.get(id);
        if cur == 0 || cur == u32::MAX {
            return None;
        }
        let b = self.bytes.get_mut(id as usize)?;
        let after = cur - 1;
        if *b == OVERFLOW {
            let overflow = Arc::make_mut(&mut self.overflow);
            if after < u32::from(OVERFLOW) {
                overflow.remove(&id);
                *b = after as u8;
            } else {
                overflow.insert(id, after);
            }
        } else {
            *b -= 1;
        }
        if after == 0 {
            *b = HELD;
        }
        Some(after)
    }

    /// Bytes of RAM the counts hold (the side map at its table's size).
    pub fn ram_bytes(&self) -> u64 {
        // A hashbrown slot of (u64, u32) and its control byte, with 8 buckets per 7 entries.
        self.bytes.ram_bytes() + self.overflow.capacity() as u64 * 17 * 8 / 7
    }

    /// Ids with counts kept in the side map.
    #[cfg(test)]
    fn overflowed(&self) -> usize {
        self.overflow.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_a_byte_and_back() {
        let mut r = RefCounts::with_len(3);
        assert_eq!(r.get(1), 0);
        assert!(!r.live(1));
        for n in 1..=600u32 {
            assert_eq!(r.add(1), Some(n));
            assert_eq!(r.get(1), n);
        }
        assert_eq!(r.overflowed(), 1);
        assert_eq!(r.get(2), 0, "a neighbour is untouched");
        for n in (0..600u32).rev() {
            assert_eq!(r.drop_one(1), Some(n));
            assert_eq!(r.get(1), n);
        }
        assert_eq!(r.overflowed(), 0, "the side map empties below 254");
        assert_eq!(r.drop_one(1), None, "nothing to drop from a free id");
        assert_eq!(r.add(3), None, "beyond the table");
        assert_eq!(r.drop_one(3), None);
    }

    #[test]
    fn free_ids_are_handed_out_lowest_first_and_reused_only_once_released() {
        let mut r = RefCounts::with_len(6);
        assert_eq!(r.take_free(), Some(1), "id 0 is never handed out");
        assert_eq!(r.take_free(), Some(2));
        assert!(r.held(1) && !r.live(1) && r.get(1) == 0);
        assert_eq!(r.add(1), Some(1));
        assert_eq!(r.add(2), Some(1));
        // The last reference goes: held, not free, until released.
        assert_eq!(r.drop_one(1), Some(0));
        assert!(r.held(1));
        assert_eq!(r.drop_one(1), None);
        assert_eq!(r.take_free(), Some(3));
        assert!(r.release(1));
        assert!(!r.release(1), "released once");
        assert_eq!(r.take_free(), Some(1), "the lowest free id again");
        // Referenced again before its release: stays in use.
        assert_eq!(r.drop_one(2), Some(0));
        assert_eq!(r.add(2), Some(1));
        assert!(!r.release(2));
        assert_eq!(r.get(2), 1);
        assert_eq!(r.take_free(), Some(4));
        assert_eq!(r.take_free(), Some(5));
        assert_eq!(r.take_free(), None, "all taken");
        r.grow_to(8);
        assert_eq!(r.take_free(), Some(6), "ids added since");
        r.release_all();
        assert!(!r.held(3) && !r.held(6));
        assert_eq!(r.get(2), 1, "live ids stay");
        assert_eq!(r.take_free(), Some(1));
        assert_eq!(r.take_free(), Some(3));
    }

    #[test]
    fn a_saturated_count_is_kept_forever() {
        let mut r = RefCounts::with_len(2);
        for _ in 0..254 {
            r.add(1);
        }
        Arc::make_mut(&mut r.overflow).insert(1, u32::MAX - 1);
        assert_eq!(r.add(1), Some(u32::MAX));
        assert_eq!(r.add(1), Some(u32::MAX));
        assert_eq!(r.drop_one(1), None);
        assert_eq!(r.get(1), u32::MAX);
    }

    #[test]
    fn a_clone_keeps_its_counts_while_the_original_changes() {
        let mut r = RefCounts::with_len(10_000);
        for _ in 0..300 {
            r.add(5);
        }
        r.add(9_000);
        let image = r.clone();
        for _ in 0..100 {
            r.drop_one(5);
        }
        r.drop_one(9_000);
        r.add(7);
        assert_eq!((image.get(5), image.get(9_000), image.get(7)), (300, 1, 0));
        assert_eq!((r.get(5), r.get(9_000), r.get(7)), (200, 0, 1));
        assert_eq!(image.overflowed(), 1);
        assert_eq!(r.overflowed(), 0);
        // A checkpoint's copy knows which ids are live, without the side map.
        let live = image.liveness();
        assert!(live.live(5) && live.live(9_000) && !live.live(7));
        assert_eq!(live.overflowed(), 0);
    }
}
