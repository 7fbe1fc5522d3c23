//! Record encode and decode (`ingot_engine::format`): a full data record's header area (header
//! plus 256 entries, sealed with its keyed MAC), decoded and verified as replay does.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::format::{
    DataEntry, LogKey, RecordHeader, RecordKind, RecordSeal, FORMAT_VERSION, MAX_RECORD_ENTRIES,
};

fn entry(i: usize) -> DataEntry {
    DataEntry {
        volume: 1,
        flags: 0,
        lba: 1000 + i as u64 * 7,
        block_id: 50_000 + i as u64,
        fingerprint: xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()).to_le_bytes(),
        payload_offset: (RecordHeader::header_area(MAX_RECORD_ENTRIES, DataEntry::BYTES) + i * 4096)
            as u32,
        stored_len: 4096,
        payload_crc: i as u32,
    }
}

fn header(entries: usize) -> RecordHeader {
    let area = RecordHeader::header_area(entries, DataEntry::BYTES);
    RecordHeader {
        version: FORMAT_VERSION as u16,
        kind: RecordKind::Data,
        seq: 77,
        shard_seq: 12,
        epoch: 3,
        segment: 9,
        entry_count: entries as u32,
        record_bytes: (area + entries * 4096) as u32,
        header_bytes: area as u32,
        durable_shard_seq: 11,
        shard: 0,
    }
}

fn record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    let key = LogKey([0x5a; 32]);
    let seal = RecordSeal {
        key: &key,
        nonce: [7; 16],
        offset: 1 << 20,
    };
    for entries in [1usize, 32, MAX_RECORD_ENTRIES] {
        let h = header(entries);
        let es: Vec<DataEntry> = (0..entries).map(entry).collect();
        let mut area = vec![0u8; h.header_bytes as usize];
        g.throughput(Throughput::Elements(entries as u64));
        g.bench_function(format!("encode_and_seal/{entries}"), |b| {
            b.iter(|| {
                for (i, e) in es.iter().enumerate() {
                    let at = RecordHeader::BYTES + i * DataEntry::BYTES;
                    e.encode(&mut area[at..at + DataEntry::BYTES]);
                }
                h.encode_and_seal(black_box(&mut area), DataEntry::BYTES, &seal);
            })
        });
        g.bench_function(format!("decode_and_verify/{entries}"), |b| {
            b.iter(|| {
                let d = RecordHeader::decode(black_box(&area)).expect("valid header");
                assert!(d.verify(&area, Some(&seal)));
                let mut sum = 0u64;
                for i in 0..d.entry_count as usize {
                    let at = d.entries_at() + i * DataEntry::BYTES;
                    sum += DataEntry::decode(&area[at..at + DataEntry::BYTES])
                        .expect("valid entry")
                        .lba;
                }
                sum
            })
        });
    }
    g.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
