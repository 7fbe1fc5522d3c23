//! Reading the superblocks of every device at open.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::{Superblock, SuperblockFault, DATA_START, IO_ALIGN, SUPERBLOCK_OFFSETS};
use crate::io::{AlignedBuf, Devices};

/// Every device's newest valid superblock, and its other slot's when that is valid too and
/// older (a commit that stopped between its two slot writes leaves the previous checkpoint
/// there).
pub(crate) fn read_superblocks(
    devices: &dyn Devices,
    paths: &[PathBuf],
) -> Result<(Vec<Superblock>, Vec<Option<Superblock>>)> {
    let mut out: Vec<Superblock> = Vec::new();
    let mut older_out = Vec::new();
    let mut buf = AlignedBuf::new(IO_ALIGN);
    for (d, path) in paths.iter().enumerate() {
        if devices.size(d as u16) < DATA_START {
            return Err(Error::NotAPool {
                path: path.clone(),
                reason: "file is too small to hold a pool",
            });
        }
        let mut best: Option<Superblock> = None;
        let mut older: Option<Superblock> = None;
        let mut fault = None;
        for off in SUPERBLOCK_OFFSETS {
            devices
                .read_at(d as u16, &mut buf, off)
                .map_err(|source| Error::File {
                    path: path.clone(),
                    source,
                })?;
            match Superblock::decode(&buf) {
                Ok(Some(sb)) => match &best {
                    Some(b) if sb.generation < b.generation => older = Some(sb),
                    Some(b) if sb.generation > b.generation => older = best.replace(sb),
                    Some(_) => {}
                    None => best = Some(sb),
                },
                Ok(None) => {}
                Err(f) => fault = Some(f),
            }
        }
        let sb = match (best, fault) {
            (Some(sb), _) => sb,
            (None, Some(SuperblockFault::Version(v))) => {
                return Err(Error::UnsupportedVersion {
                    path: path.clone(),
                    found: v,
                    supported: crate::format::FORMAT_VERSION_PAGED,
                })
            }
            (None, Some(SuperblockFault::Checksum)) => {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "both superblock copies fail their checksum",
                })
            }
            (None, None) => {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "no ingot superblock (foreign file?)",
                })
            }
        };
        if sb.device_index as usize != d || sb.device_count as usize != paths.len() {
            return Err(Error::NotAPool {
                path: path.clone(),
                reason: "device order or count does not match pool.json",
            });
        }
        if let Some(first) = out.first() {
            if first.pool_uuid != sb.pool_uuid {
                return Err(Error::NotAPool {
                    path: path.clone(),
                    reason: "device belongs to another pool",
                });
            }
        }
        if !sb.segment_bytes.is_power_of_two() || sb.segment_bytes < 2 << 20 {
            return Err(Error::Corrupt {
                what: "superblock segment size",
            });
        }
        out.push(sb);
        older_out.push(older);
    }
    Ok((out, older_out))
}
