//! Format 3 checkpoints (issue 22): a root and metadata pages instead of one blob, written
//! only where they changed: every new pool (`PoolOptions::paged_metadata`, the default), and
//! older ones once an open upgrades them (`upgrade.rs`); the model tests run on both formats
//! (`model_paged_metadata*` on format 3).

mod common;

use ingot_engine::{CreateOptions, IoKind, Pool, PoolOptions};

const BLOCK: usize = 4096;

fn opts() -> PoolOptions {
    PoolOptions {
        io: IoKind::Sync,
        shards: 2,
        cache_bytes: Some(0),
        ..Default::default()
    }
}

fn create(dir: &std::path::Path, size: u64) -> Pool {
    let c = CreateOptions {
        size_bytes: size,
        segment_bytes: 2 << 20,
        ..Default::default()
    };
    Pool::create(dir, &c, &opts()).expect("create")
}

/// Distinct, incompressible blocks.
fn blocks(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64)
        .flat_map(|i| common::xorshift_block(seed << 32 | i))
        .collect()
}

fn assert_clean(pool: &Pool) {
    let report = pool.check(&mut |_, _| {});
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

fn superblock_version(dir: &std::path::Path) -> u32 {
    let dev = std::fs::read(dir.join("dev0.img")).unwrap();
    u32::from_le_bytes(dev[8..12].try_into().unwrap())
}

/// A format 3 pool keeps its version, and its volumes, snapshot included, read back after a
/// clean reopen and after a crash. The snapshot's map leaves stay shared across the reopen:
/// the engine holds about as much map RAM as before the snapshot (a format 2 pool held a second
/// copy of every leaf after it reopened).
#[test]
fn a_paged_pool_reopens_with_its_snapshots_still_sharing_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 256 << 20);
    pool.create_volume("v", 64 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let data = blocks(1, 8192);
    v.write(0, &data, false).unwrap();
    v.flush().unwrap();
    let before = pool.stats().metadata_ram_bytes;
    pool.snapshot_volume("v", "s").unwrap();
    let changed = blocks(2, 16);
    v.write(0, &changed, false).unwrap();
    v.flush().unwrap();
    pool.shutdown().unwrap();
    drop(pool);
    assert_eq!(superblock_version(dir.path()), 3);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    let now = read_all(&pool, "v", 8192 * BLOCK);
    assert!(now[..16 * BLOCK] == changed[..] && now[16 * BLOCK..] == data[16 * BLOCK..]);
    assert!(
        read_all(&pool, "s", 8192 * BLOCK) == data,
        "the snapshot changed"
    );
    assert_clean(&pool);
    // 16 leaves of 4 KiB per copy of the map; the rest is the same before and after.
    let after = pool.stats().metadata_ram_bytes;
    assert!(
        after < before + (16 << 10),
        "the snapshot's leaves were not kept shared: {before} -> {after}"
    );
    // A crash after more flushed writes: replayed on top of the format 3 checkpoint.
    let v = pool.volume("v").unwrap();
    let more = blocks(3, 64);
    v.write(100 * BLOCK as u64, &more, false).unwrap();
    v.flush().unwrap();
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    let got = pool
        .volume("v")
        .unwrap()
        .read(100 * BLOCK as u64, (64 * BLOCK) as u32)
        .unwrap();
    assert!(got == more, "flushed writes lost at a crash");
    assert_clean(&pool);
}

/// Checkpoints one after another on a small pool: each writes a whole image, and the one
/// before the previous is freed, so the pool never runs out of room for them.
#[test]
fn paged_checkpoints_give_back_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 64 << 20);
    pool.create_volume("v", 16 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    // The same 8 MiB rewritten over and over: once it is all written, free space stays level
    // (whole checkpoints: the one before the previous is freed at each commit).
    let mut free_after = Vec::new();
    for round in 0..120u64 {
        v.write((round % 32) * 64 * BLOCK as u64, &blocks(round, 64), false)
            .unwrap();
        pool.checkpoint().unwrap();
        free_after.push(pool.stats().segments_free);
    }
    let (settled, last) = (free_after[40], free_after[119]);
    assert!(
        last + 2 >= settled,
        "{settled} segments free after 40 checkpoints, {last} after 120: {free_after:?}"
    );
    assert_clean(&pool);
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    assert_clean(&pool);
}

fn read_all(pool: &Pool, name: &str, len: usize) -> Vec<u8> {
    let v = pool.volume(name).unwrap();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(16 << 20);
        out.extend_from_slice(&v.read(out.len() as u64, n as u32).unwrap());
    }
    out
}

/// Device bytes the next checkpoint writes.
fn checkpoint_bytes(pool: &Pool) -> u64 {
    let before = pool.stats().device_written_breakdown.checkpoint_bytes;
    pool.checkpoint().unwrap();
    pool.stats().device_written_breakdown.checkpoint_bytes - before
}

/// After the first checkpoint, one writes what changed since the one before, not the pool:
/// a block overwritten costs a few pages (its table, liveness and map leaves, the directory
/// page, the paths above them, the root), where the first checkpoint after an open writes
/// every page. What was not rewritten still reads back after a reopen.
#[test]
fn a_checkpoint_writes_what_changed_not_the_whole_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 256 << 20);
    pool.create_volume("v", 128 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let data = blocks(1, 24 << 10);
    for (i, part) in data.chunks(4 << 20).enumerate() {
        v.write((i * (4 << 20)) as u64, part, false).unwrap();
    }
    pool.checkpoint().unwrap();
    let quiet = checkpoint_bytes(&pool);
    let one = blocks(2, 1);
    v.write(5000 * BLOCK as u64, &one, false).unwrap();
    let small = checkpoint_bytes(&pool);
    pool.shutdown().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    // The open's own checkpoint wrote everything; the next names it all again.
    let v = pool.volume("v").unwrap();
    v.write(9000 * BLOCK as u64, &one, false).unwrap();
    let after_open = checkpoint_bytes(&pool);
    let first_after_open = {
        // An open starts from nothing it wrote: measure a whole write-out by reopening.
        pool.shutdown().unwrap();
        drop(pool);
        let before = {
            let p = Pool::open(dir.path(), &opts()).unwrap();
            let b = p.stats().device_written_breakdown.checkpoint_bytes;
            p.shutdown().unwrap();
            b
        };
        before
    };
    // 24 Ki blocks: ~100 table pages, 7 liveness pages, 48 map leaves and their directory.
    assert!(
        first_after_open > 150 * BLOCK as u64,
        "a whole checkpoint wrote {first_after_open} bytes"
    );
    for (what, bytes) in [
        ("nothing", quiet),
        ("one block", small),
        ("one block after an open", after_open),
    ] {
        assert!(
            bytes * 8 < first_after_open,
            "a checkpoint after {what} changed wrote {bytes} bytes, a whole one {first_after_open}"
        );
    }
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    let mut want = data;
    want[5000 * BLOCK..5001 * BLOCK].copy_from_slice(&one);
    want[9000 * BLOCK..9001 * BLOCK].copy_from_slice(&one);
    let got = read_all(&pool, "v", want.len());
    assert!(got == want, "data lost across incremental checkpoints");
    assert_clean(&pool);
}

/// Pages that never change stay where they were written, beside pages later checkpoints
/// superseded: without cleaning, each segment some of them keep would stay taken. Hundreds of
/// checkpoints that each change one block leave free space level, and everything reads back
/// after a crash.
#[test]
fn cold_metadata_pages_do_not_pin_segments() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 192 << 20);
    pool.create_volume("v", 96 << 20).unwrap();
    let v = pool.volume("v").unwrap();
    let mut want = blocks(7, 16 << 10);
    for (i, part) in want.chunks(4 << 20).enumerate() {
        v.write((i * (4 << 20)) as u64, part, false).unwrap();
    }
    pool.checkpoint().unwrap();
    let mut free_after = Vec::new();
    for round in 0..240usize {
        // A block in a different leaf, table page and liveness page each time.
        let lba = (round * 1021) % (16 << 10);
        let b = blocks(1000 + round as u64, 1);
        v.write((lba * BLOCK) as u64, &b, false).unwrap();
        want[lba * BLOCK..(lba + 1) * BLOCK].copy_from_slice(&b);
        pool.checkpoint().unwrap();
        free_after.push(pool.stats().segments_free);
    }
    let (settled, last) = (free_after[60], free_after[239]);
    assert!(
        last + 2 >= settled,
        "{settled} segments free after 60 checkpoints, {last} after 240: {free_after:?}"
    );
    assert_clean(&pool);
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    let got = read_all(&pool, "v", want.len());
    assert!(got == want, "data lost after cleaning metadata segments");
    assert_clean(&pool);
}

/// A superblock whose root pointer was changed (CRC recomputed, as a tool or a bug would):
/// off the page grid, past its segment, or at a page that is not a root. The open refuses the
/// pool as corrupt, it does not panic or read past the segment.
#[test]
fn a_root_pointer_that_leads_elsewhere_is_refused() {
    for bad in [4097u32, 2 << 20, 8192] {
        let dir = tempfile::tempdir().unwrap();
        let pool = create(dir.path(), 64 << 20);
        pool.create_volume("v", 4 << 20).unwrap();
        pool.volume("v")
            .unwrap()
            .write(0, &blocks(9, 16), false)
            .unwrap();
        pool.shutdown().unwrap();
        drop(pool);
        let path = dir.path().join("dev0.img");
        let mut dev = std::fs::read(&path).unwrap();
        for slot in [0usize, 4096] {
            let sb = &mut dev[slot..slot + 192];
            sb[100..104].copy_from_slice(&bad.to_le_bytes());
            sb[188..192].fill(0);
            let crc = crc32fast::hash(sb);
            sb[188..192].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(&path, &dev).unwrap();
        match Pool::open(dir.path(), &opts()) {
            Err(e) => assert_eq!(
                e.kind(),
                ingot_engine::ErrorKind::BadPool,
                "offset {bad}: {e}"
            ),
            Ok(_) => panic!("opened with the root pointer at {bad}"),
        }
    }
}

/// A volume whose directory (16 bytes per 2 MiB of its size, mapped or not) would not fit in
/// the space kept for checkpoints is refused at once, as is growth to such a size: every later
/// checkpoint would have to write it. A volume that fits is created as usual.
#[test]
fn a_volume_whose_directory_cannot_be_checkpointed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 64 << 20);
    let huge = 1u64 << 50;
    assert!(matches!(
        pool.create_volume("huge", huge),
        Err(ingot_engine::Error::NoSpace)
    ));
    pool.create_volume("v", 1 << 30).unwrap();
    assert!(matches!(
        pool.resize_volume("v", huge),
        Err(ingot_engine::Error::NoSpace)
    ));
    pool.resize_volume("v", 2 << 30).unwrap();
    pool.checkpoint().unwrap();
    assert_clean(&pool);
}

/// An open's recovery checkpoint writes what the replayed log changed, not the whole image
/// again: the pages it does not rewrite stay where the checkpoint it read put them (retained
/// by their counts), and still read back after more crashes and reopens, a snapshot's shared
/// leaves included, with map leaves evicted past a small metadata cache; free space stays
/// level across the reopens.
#[test]
fn a_reopen_writes_what_replay_changed_not_the_whole_pool() {
    let dir = tempfile::tempdir().unwrap();
    // Reopened with 16 leaves' worth of metadata cache (the fill keeps every leaf, so that
    // its checkpoint is the whole image).
    let small = || PoolOptions {
        metadata_cache_bytes: Some(64 << 10),
        ..opts()
    };
    let pool = create(dir.path(), 1 << 30);
    let n = 64usize << 10;
    pool.create_volume("v", (n * BLOCK) as u64).unwrap();
    // Distinct blocks that compress to little: 64 Ki ids in a few MiB of log.
    let block = |i: usize, gen: u64| {
        let mut b = vec![0u8; BLOCK];
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
        b[8..16].copy_from_slice(&gen.to_le_bytes());
        b
    };
    let v = pool.volume("v").unwrap();
    for chunk in 0..n / 1024 {
        let buf: Vec<u8> = (chunk * 1024..(chunk + 1) * 1024)
            .flat_map(|i| block(i, 0))
            .collect();
        v.write((chunk * 1024 * BLOCK) as u64, &buf, false).unwrap();
    }
    // Its first checkpoint writes every page of the image.
    let whole = checkpoint_bytes(&pool);
    assert!(
        whole > 500 * BLOCK as u64,
        "the first checkpoint wrote {whole} bytes"
    );
    pool.snapshot_volume("v", "s").unwrap();
    let mut gen = vec![0u64; n];
    let mut pool = pool;
    let mut free = Vec::new();
    for round in 1..=8u64 {
        // A crash after a few more flushed writes.
        let v = pool.volume("v").unwrap();
        for i in (round as usize * 7..n).step_by(4099) {
            v.write((i * BLOCK) as u64, &block(i, round), false)
                .unwrap();
            gen[i] = round;
        }
        v.flush().unwrap();
        pool.halt();
        drop(pool);
        pool = Pool::open(dir.path(), &small()).unwrap();
        let st = pool.stats();
        let recovery = st.device_written_breakdown.checkpoint_bytes;
        // After the first crash, the pages of the replayed writes; later, a checkpoint may
        // also clean a metadata segment the image has spread into (up to a segment's worth of
        // pages, less than the image here), never rewrite the whole image.
        let bound = if round == 1 { whole / 8 } else { whole };
        assert!(
            recovery < bound,
            "round {round}: the open's checkpoint wrote {recovery} bytes, a whole one {whole}"
        );
        free.push(st.segments_free);
    }
    let (lo, hi) = (free.iter().min().unwrap(), free.iter().max().unwrap());
    assert!(hi - lo <= 8, "free segments across the reopens: {free:?}");
    let got = read_all(&pool, "v", n * BLOCK);
    for (i, b) in got.chunks(BLOCK).enumerate() {
        assert!(b == block(i, gen[i]), "block {i} lost across reopens");
    }
    let got = read_all(&pool, "s", n * BLOCK);
    for (i, b) in got.chunks(BLOCK).enumerate() {
        assert!(b == block(i, 0), "snapshot block {i} lost across reopens");
    }
    assert!(pool.stats().metadata_cache_evictions > 0);
    assert_clean(&pool);
}

/// A volume of more leaves than an open reads at a time (256): every leaf comes back, at the
/// index it was written for, after a clean reopen and after a crash.
#[test]
fn a_volume_of_many_leaves_reopens_whole() {
    const LEAF: usize = 512;
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 256 << 20);
    let leaves = 600usize;
    pool.create_volume("v", (leaves * LEAF * BLOCK) as u64)
        .unwrap();
    let v = pool.volume("v").unwrap();
    let data = blocks(7, leaves);
    for (i, b) in data.chunks(BLOCK).enumerate() {
        v.write(((i * LEAF + i % 13) * BLOCK) as u64, b, false)
            .unwrap();
    }
    v.flush().unwrap();
    pool.checkpoint().unwrap();
    pool.shutdown().unwrap();
    drop(pool);
    let check = |pool: &Pool| {
        let v = pool.volume("v").unwrap();
        for (i, want) in data.chunks(BLOCK).enumerate() {
            let got = v
                .read(((i * LEAF + i % 13) * BLOCK) as u64, BLOCK as u32)
                .unwrap();
            assert!(got == want, "leaf {i} came back wrong");
        }
        assert_clean(pool);
    };
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    check(&pool);
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &opts()).unwrap();
    check(&pool);
}

/// An open takes the reference counts and the segments' usage the checkpoint stored
/// (`ROOT_COUNTS`): it reads no block-table leaf and keeps no map leaf's entries, yet every
/// count is exact (a block shared 300 times included: its count lives in the root), which
/// `check` verifies against the maps, and so are the space figures; the same after a crash,
/// whose replay changes counts of blocks whose leaves it reads back.
#[test]
fn an_open_takes_the_stored_counts_and_reads_no_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 256 << 20);
    pool.create_volume("v", 1 << 30).unwrap();
    let v = pool.volume("v").unwrap();
    let data = blocks(3, 8192);
    v.write(0, &data, false).unwrap();
    // A block in each of 400 more map leaves (2 MiB apart), which the open must not read.
    let sparse = blocks(6, 400);
    for i in 0..400 {
        v.write(
            ((40 + i) << 21) as u64,
            &sparse[i * BLOCK..(i + 1) * BLOCK],
            false,
        )
        .unwrap();
    }
    // One block 300 times (deduplicated): a count past a byte.
    let same: Vec<u8> = data[..BLOCK].repeat(300);
    v.write((8192 * BLOCK) as u64, &same, false).unwrap();
    v.flush().unwrap();
    pool.snapshot_volume("v", "s").unwrap();
    let changed = blocks(4, 16);
    v.write(0, &changed, false).unwrap();
    v.flush().unwrap();
    assert_clean(&pool);
    let figures = |p: &Pool| {
        let s = p.stats();
        let mapped: Vec<u64> = s.volumes.iter().map(|v| v.mapped_bytes).collect();
        (s.unique_blocks, s.stored_bytes, mapped)
    };
    let before = figures(&pool);
    pool.shutdown().unwrap();
    drop(pool);
    let small = PoolOptions {
        metadata_cache_bytes: Some(64 << 10),
        ..opts()
    };
    let pool = Pool::open(dir.path(), &small).unwrap();
    let s = pool.stats();
    assert_eq!(
        (s.metadata_cache_table_misses, s.metadata_cache_misses),
        (0, 0),
        "the open read leaves back"
    );
    // The root, the directories (3 pages a volume), the block table's interior page and last
    // leaf, the count and usage pages and the dedup index: not the 417 map leaves.
    assert!(
        s.metadata_open_pages < 64,
        "the open read {} pages",
        s.metadata_open_pages
    );
    assert!(
        s.metadata_cache_bytes <= 8 << 10,
        "the open kept {} bytes of leaves",
        s.metadata_cache_bytes
    );
    assert_eq!(figures(&pool), before);
    assert_clean(&pool);
    let now = read_all(&pool, "v", 8492 * BLOCK);
    assert!(now[..16 * BLOCK] == changed[..], "v's new blocks");
    assert!(
        now[16 * BLOCK..8192 * BLOCK] == data[16 * BLOCK..],
        "v's old blocks"
    );
    assert!(now[8192 * BLOCK..] == same[..], "the shared block");
    assert!(read_all(&pool, "s", 8192 * BLOCK) == data, "the snapshot");
    // A crash after the shared block lost 100 of its references and more blocks changed:
    // replay moves the stored counts on from where the checkpoint left them.
    let v = pool.volume("v").unwrap();
    let other = blocks(5, 100);
    v.write((8192 * BLOCK) as u64, &other, false).unwrap();
    v.write((4000 * BLOCK) as u64, &changed, false).unwrap();
    v.flush().unwrap();
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &small).unwrap();
    assert_clean(&pool);
    let got = read_all(&pool, "v", 8492 * BLOCK);
    assert!(got[8192 * BLOCK..8292 * BLOCK] == other[..]);
    assert!(got[8292 * BLOCK..] == same[100 * BLOCK..]);
    assert!(got[4000 * BLOCK..4016 * BLOCK] == changed[..]);
    assert!(
        read_all(&pool, "s", 8192 * BLOCK) == data,
        "the snapshot after the crash"
    );
    // And once more through a clean open of what that recovery checkpoint wrote.
    let after_crash = figures(&pool);
    pool.shutdown().unwrap();
    drop(pool);
    let pool = Pool::open(dir.path(), &small).unwrap();
    assert_eq!(figures(&pool), after_crash);
    assert_clean(&pool);
}

/// Evicted leaves a request needs are read through its shard's queue while the request
/// waits and the shard goes on with its others (`shard::fetch`): with 256 leaves of cache for
/// over 400, reads from four threads and through a `Reader`, overwrites, a trim and a
/// snapshot's copies leave no shard thread waiting for a page in a blocking read, and
/// everything reads back, also after a crash.
#[test]
fn evicted_leaves_are_read_through_the_shards_queues() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(dir.path(), 256 << 20);
    pool.create_volume("v", 1 << 30).unwrap();
    let v = pool.volume("v").unwrap();
    // Four blocks in each of 420 map leaves (2 MiB apart).
    const LEAVES: usize = 420;
    let data = blocks(7, 4 * LEAVES);
    for i in 0..LEAVES {
        v.write(
            (i << 21) as u64,
            &data[4 * i * BLOCK..4 * (i + 1) * BLOCK],
            false,
        )
        .unwrap();
    }
    v.flush().unwrap();
    pool.snapshot_volume("v", "s").unwrap();
    pool.shutdown().unwrap();
    drop(pool);
    let small = PoolOptions {
        io: IoKind::Auto,
        metadata_cache_bytes: Some(1 << 20),
        ..opts()
    };
    let pool = std::sync::Arc::new(Pool::open(dir.path(), &small).unwrap());
    let expect = |i: usize, data: &[u8]| data[4 * i * BLOCK..4 * (i + 1) * BLOCK].to_vec();
    // Reads, four threads at a time, each over every fourth leaf.
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                let v = pool.volume("v").unwrap();
                for i in (t..LEAVES).step_by(4) {
                    let got = v.read((i << 21) as u64, (4 * BLOCK) as u32).unwrap();
                    assert!(got == expect(i, &data), "leaf {i}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    // Reads on a caller's own queue (`Reader`, as an NBD connection's) send a miss to the
    // shard instead of waiting for the page on the caller's thread.
    {
        let v = pool.volume("v").unwrap();
        let mut r = ingot_engine::Reader::new(&v, 8).unwrap();
        for i in (0..LEAVES).rev() {
            let got = common::read_through(&mut r, (i << 21) as u64, (4 * BLOCK) as u32).unwrap();
            assert!(got == expect(i, &data), "leaf {i} through a reader");
        }
        assert!(r.handed_off() > 0, "no read missed");
    }
    // Overwrites of one block in every third leaf (their applies need the leaves, and the
    // block-table leaves of the blocks they replace), and a trim over 8 leaves.
    let v = pool.volume("v").unwrap();
    let new = blocks(8, LEAVES);
    for i in (0..LEAVES).step_by(3) {
        v.write((i << 21) as u64, &new[i * BLOCK..(i + 1) * BLOCK], false)
            .unwrap();
    }
    v.trim(100 << 21, 8 << 21, false).unwrap();
    v.flush().unwrap();
    let check = |pool: &Pool| {
        let v = pool.volume("v").unwrap();
        let s = pool.volume("s").unwrap();
        for i in 0..LEAVES {
            let mut want = expect(i, &data);
            if (100..108).contains(&i) {
                want.fill(0);
            } else if i % 3 == 0 {
                want[..BLOCK].copy_from_slice(&new[i * BLOCK..(i + 1) * BLOCK]);
            }
            let got = v.read((i << 21) as u64, (4 * BLOCK) as u32).unwrap();
            assert!(got == want, "v's leaf {i}");
            let got = s.read((i << 21) as u64, (4 * BLOCK) as u32).unwrap();
            assert!(got == expect(i, &data), "s's leaf {i}");
        }
    };
    check(&pool);
    let st = pool.stats();
    assert!(
        st.metadata_ring_reads >= LEAVES as u64,
        "{} pages read through the queues",
        st.metadata_ring_reads
    );
    assert_eq!(
        st.metadata_shard_waits, 0,
        "a shard's thread waited for a page ({} read through the queues)",
        st.metadata_ring_reads
    );
    assert_clean(&pool);
    pool.halt();
    drop(pool);
    let pool = Pool::open(dir.path(), &small).unwrap();
    check(&pool);
    assert_clean(&pool);
}
