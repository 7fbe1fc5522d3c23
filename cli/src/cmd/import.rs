//! `ingot volume import`: copy a raw image into a new volume, with the pool opened here.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ingot_engine::{Pool, PoolOptions};

use super::volume::PolicyArgs;
use crate::control::{self, Request};
use crate::progress::Progress;
use crate::size::human;

pub fn import(
    dir: &Path,
    name: &str,
    file: &Path,
    size: Option<u64>,
    policy: PolicyArgs,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    const IN_FLIGHT: usize = 16;
    const BLOCK: usize = 4096;
    if control::call(dir, &Request::VolumeList).is_some() {
        bail!(
            "pool {} is served by a running `ingot serve`: create the volume with `ingot volume \
             create`, then copy into it with `nbdcopy {} 'nbd+unix:///{name}?socket=SOCKET'` \
             (or stop the server and import again)",
            dir.display(),
            file.display()
        );
    }
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    // Seeking to the end sizes block devices too (their metadata says 0).
    let image = (&f)
        .seek(SeekFrom::End(0))
        .with_context(|| format!("sizing {}", file.display()))?;
    let vol_size = size.unwrap_or(image.next_multiple_of(512)).max(512);
    if image > vol_size {
        bail!(
            "{} holds {} but --size is {}",
            file.display(),
            human(image),
            human(vol_size)
        );
    }
    crate::store::refuse_local_write(dir)?;
    let pool = Pool::open(dir, &PoolOptions::default())
        .with_context(|| format!("opening pool {}", dir.display()))?;
    let start = std::time::Instant::now();
    let stored_before = pool.stats().stored_bytes;
    pool.create_volume_in(name, vol_size, policy.dedup_domain.unwrap_or_default())?;
    if policy.dedup.is_some() || policy.compression.is_some() {
        pool.set_volume_policy(name, policy.dedup, policy.compression)?;
    }
    let vol = pool.volume(name)?;
    let mut progress = Progress::new();
    let (tx, rx) = crossbeam_channel::unbounded::<ingot_engine::Result<()>>();
    let mut in_flight = 0usize;
    let mut first_err: Option<ingot_engine::Error> = None;
    // Collect the writes that finished, then wait until at most `max` are in flight.
    let settle =
        |in_flight: &mut usize, max: usize, first_err: &mut Option<ingot_engine::Error>| {
            let mut note = |r: ingot_engine::Result<()>, in_flight: &mut usize| {
                *in_flight -= 1;
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            };
            while let Ok(r) = rx.try_recv() {
                note(r, in_flight);
            }
            while *in_flight > max {
                match rx.recv() {
                    Ok(r) => note(r, in_flight),
                    Err(_) => break,
                }
            }
        };
    let (mut written, mut last_shown) = (0u64, 0u64);
    let mut first_read_err: Option<String> = None;
    let mut buf = vec![0u8; CHUNK];
    // Where the file system cannot tell (a block device), all of the image may hold data.
    let extents = ingot_engine::io::sync::data_extents(&f, image).unwrap_or(vec![(0, image)]);
    'extents: for (from, to) in extents {
        let mut at = from - from % BLOCK as u64;
        while at < to {
            let n = ((to - at) as usize).min(CHUNK);
            let got = &mut buf[..n];
            if let Err(e) = f.read_exact_at(got, at) {
                first_read_err = Some(format!("reading {} at {at}: {e}", file.display()));
                break 'extents;
            }
            // Runs of blocks that are not all zeroes (a new volume reads zeroes elsewhere).
            let mut i = 0;
            while i < n {
                let nonzero = |j: usize| got[j..(j + BLOCK).min(n)].iter().any(|&b| b != 0);
                if !nonzero(i) {
                    i += BLOCK;
                    continue;
                }
                let mut j = i;
                while j < n && nonzero(j) {
                    j += BLOCK;
                }
                let end = j.min(n);
                // The image's last bytes go out padded to the volume's 512-byte sectors.
                let mut data = got[i..end].to_vec();
                data.resize(data.len().next_multiple_of(512), 0);
                written += data.len() as u64;
                let tx = tx.clone();
                vol.submit(
                    ingot_engine::Request::Write {
                        offset: at + i as u64,
                        data: bytes::Bytes::from(data),
                        fua: false,
                    },
                    Box::new(move |r| {
                        let _ = tx.send(r.map(|_| ()));
                    }),
                );
                in_flight += 1;
                settle(&mut in_flight, IN_FLIGHT, &mut first_err);
                if first_err.is_some() {
                    break 'extents;
                }
                i = j;
            }
            at += n as u64;
            if at - last_shown >= image / 100 || at >= image {
                last_shown = at;
                progress.draw(format_args!(
                    "importing: {} of {} ({}%)",
                    human(at),
                    human(image),
                    at * 100 / image.max(1)
                ));
            }
        }
    }
    settle(&mut in_flight, 0, &mut first_err);
    progress.draw(format_args!(
        "importing: {} of {} (100%)",
        human(image),
        human(image)
    ));
    progress.finish();
    let failed = match (first_err, first_read_err) {
        (Some(e), _) => Some(e.to_string()),
        (None, Some(e)) => Some(e),
        (None, None) => vol.flush().err().map(|e| e.to_string()),
    };
    if let Some(why) = failed {
        // A half-written volume would pass for an import: take it away again.
        let gone = pool.delete_volume(name);
        let _ = pool.shutdown();
        let left = match gone {
            Ok(()) => "the partial volume was deleted".to_string(),
            Err(e) => format!("the partial volume {name} is left (deleting it failed: {e})"),
        };
        bail!("importing {} into {name}: {why}; {left}", file.display());
    }
    let stored = pool.stats().stored_bytes.saturating_sub(stored_before);
    pool.shutdown()?;
    let secs = start.elapsed().as_secs_f64();
    outln!(
        "imported {} into volume {name} ({}): {} of data written, the rest holes; {} stored; \
         {:.1} s ({:.0} MB/s)",
        file.display(),
        human(vol_size),
        human(written),
        human(stored),
        secs,
        image as f64 / secs.max(1e-9) / 1e6
    );
    Ok(())
}
