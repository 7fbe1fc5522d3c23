//! Shared by the `ingot-bench` tool and the criterion benches: the deterministic customs data
//! generator and database-like pages built from it.

pub mod gen;
pub mod pages;
