//! `ingot-bench db-batch` (filled in below).
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct DbBatchArgs {}

pub fn run(_a: &DbBatchArgs) -> Result<()> {
    Ok(())
}
