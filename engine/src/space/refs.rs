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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::blocks::Chunked;

/// The byte of a count kept in `overflow`.
const OVERFLOW: u8 = 254;

/// The byte of an id held with no reference (see the module's table).
const HELD: u8 = 255;

/// Ids per part of the side map: the unit an image shares and a change copies.
const OVERFLOW_PART: u64 = 1 << 14;

/// Counts of 254 and more, in parts of [`OVERFLOW_PART`] ids shared copy-on-write with a
/// checkpoint's image: the first change after a cut copies one part (at most 16 Ki entries),
/// not the whole map (every block of a volume with 254 snapshots is in it).
#[derive(Clone, Default)]
struct Overflow {
    parts: BTreeMap<u64, Arc<HashMap<u64, u32>>>,
    len: usize,
}

impl Overflow {
    fn get(&self, id: u64) -> Option<u32> {
        self.parts.get(&(id / OVERFLOW_PART))?.get(&id).copied()
    }

    fn insert(&mut self, id: u64, n: u32) {
        let part = Arc::make_mut(self.parts.entry(id / OVERFLOW_PART).or_default());
        if part.insert(id, n).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, id: u64) {
        let key = id / OVERFLOW_PART;
        let Some(part) = self.parts.get_mut(&key) else {
            return;
        };
        if !part.contains_key(&id) {
            return;
        }
        let part = Arc::make_mut(part);
        part.remove(&id);
        self.len -= 1;
        if part.is_empty() {
            self.parts.remove(&key);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.parts
            .values()
            .flat_map(|p| p.iter().map(|(&id, &n)| (id, n)))
    }

    fn capacity(&self) -> usize {
        self.parts.values().map(|p| p.capacity()).sum()
    }
}

/// Reference counts by block id, copied on write by chunk like the block table (a checkpoint's
/// image clones them inside its pause).
#[derive(Clone, Default)]
pub struct RefCounts {
    bytes: Chunked<u8>,
    /// Counts of 254 and more.
    overflow: Overflow,
    /// No free id lies below it (ids from 1).
    cursor: usize,
}

impl std::fmt::Debug for RefCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefCounts")
            .field("ids", &self.bytes.len())
            .field("overflowed", &self.overflow.len)
            .finish()
    }
}

impl RefCounts {
    /// Counts as a checkpoint stored them (`stored`: a byte per id as [`RefCounts::stored_byte`]
    /// wrote it, `overflow`: the counts of the ids whose byte is 254). A byte of 254 without
    /// its count, a count for another byte, or one under 254 is corruption.
    pub fn from_stored(
        stored: impl IntoIterator<Item = u8>,
        overflow: &[(u64, u32)],
    ) -> Result<RefCounts, &'static str> {
        let mut r = RefCounts {
            bytes: stored.into_iter().collect(),
            overflow: Overflow::default(),
            cursor: 1,
        };
        if r.bytes.len() == 0 {
            r.bytes.push(0);
        }
        for &(id, n) in overflow {
            if r.bytes.get(id as usize) != Some(&OVERFLOW)
                || n < u32::from(OVERFLOW)
                || r.overflow.get(id).is_some()
            {
                return Err("reference count overflow entry");
            }
            r.overflow.insert(id, n);
        }
        let marked = r.bytes.iter().filter(|&&b| b == OVERFLOW).count();
        if marked != r.overflow.len || r.bytes.iter().any(|&b| b == HELD) {
            return Err("reference count bytes");
        }
        // Loading is not a change.
        r.bytes.take_changed();
        Ok(r)
    }

    /// The byte a checkpoint stores for `id`: its count up to 253, 254 for a larger count (in
    /// [`RefCounts::overflowed`]), 0 for a free or held id (an open releases every held id).
    pub fn stored_byte(&self, id: u64) -> u8 {
        match self.bytes.get(id as usize) {
            None | Some(&HELD) => 0,
            Some(&b) => b,
        }
    }

    /// The ids whose count is 254 or more, with their counts.
    pub fn overflowed(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.overflow.iter()
    }

    /// How many ids have a count of 254 or more.
    pub fn overflow_len(&self) -> usize {
        self.overflow.len
    }

    /// Whether `id` is referenced or held: handed out (a block was, or is being, stored under
    /// it) and not released since.
    pub fn in_use(&self, id: u64) -> bool {
        self.bytes.get(id as usize).is_some_and(|&b| b != 0)
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
            Some(&OVERFLOW) => self.overflow.get(id).unwrap_or(u32::from(OVERFLOW)),
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
        if *b == OVERFLOW - 1 {
            *b = OVERFLOW;
            self.overflow.insert(id, u32::from(OVERFLOW));
            return Some(u32::from(OVERFLOW));
        }
        let c = self
            .overflow
            .get(id)
            .unwrap_or(u32::from(OVERFLOW))
            .saturating_add(1);
        self.overflow.insert(id, c);
        Some(c)
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
            if after < u32::from(OVERFLOW) {
                self.overflow.remove(id);
                *b = after as u8;
            } else {
                self.overflow.insert(id, after);
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
        assert_eq!(r.overflow_len(), 1);
        assert_eq!(r.get(2), 0, "a neighbour is untouched");
        for n in (0..600u32).rev() {
            assert_eq!(r.drop_one(1), Some(n));
            assert_eq!(r.get(1), n);
        }
        assert_eq!(r.overflow_len(), 0, "the side map empties below 254");
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
        r.overflow.insert(1, u32::MAX - 1);
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
        assert_eq!(image.overflow_len(), 1);
        assert_eq!(r.overflow_len(), 0);
    }

    /// What a checkpoint stores of the counts reads back as the same counts; held ids come
    /// back free; inconsistent stored counts are refused.
    #[test]
    fn stored_counts_read_back() {
        let mut r = RefCounts::with_len(40_000);
        for _ in 0..300 {
            r.add(5);
        }
        for _ in 0..254 {
            r.add(30_000);
        }
        r.add(7);
        r.add(8);
        r.drop_one(8);
        assert_eq!(r.take_free(), Some(1));
        let stored: Vec<u8> = (0..40_000).map(|id| r.stored_byte(id)).collect();
        let over: Vec<(u64, u32)> = r.overflowed().collect();
        assert_eq!(over.len(), 2);
        let back = RefCounts::from_stored(stored.iter().copied(), &over).unwrap();
        for id in 0..40_000u64 {
            let want = if r.live(id) { r.get(id) } else { 0 };
            assert_eq!(back.get(id), want, "id {id}");
        }
        assert!(
            back.is_free(1) && back.is_free(8),
            "held ids come back free"
        );
        assert!(RefCounts::from_stored(stored.iter().copied(), &over[..1]).is_err());
        let mut bad = over.clone();
        bad.push((7, 300));
        assert!(RefCounts::from_stored(stored.iter().copied(), &bad).is_err());
        assert!(RefCounts::from_stored([0u8, 255], &[]).is_err());
    }
}
