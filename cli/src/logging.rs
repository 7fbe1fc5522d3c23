//! Log output: every `tracing` event of the CLI, the engine (`ingot_engine::...`) and the
//! front ends goes to stderr, human-readable or as JSON lines. Stdout stays for the commands'
//! results, which scripts and tests parse.

use std::io::{self, IsTerminal};

use tracing_subscriber::EnvFilter;

use crate::progress::LogLine;

// No doc comments on the values: clap would then print every command's help in its long form.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Level when neither INGOT_LOG nor RUST_LOG says.
const DEFAULT_FILTER: &str = "info";

/// Install the subscriber; called once, before any command runs.
pub fn init(format: LogFormat) {
    let (filter, bad) = filter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogLine::default);
    // A second init (none today) would fail harmlessly: the first subscriber stays.
    let _ = match format {
        LogFormat::Human => builder.with_ansi(io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some((var, value, e)) = bad {
        tracing::warn!("{var}={value:?} is not a valid filter ({e}); logging at {DEFAULT_FILTER}");
    }
}

/// The filter from INGOT_LOG (ours, so it wins) or RUST_LOG, else the default; a bad one falls
/// back to the default rather than failing the command, and is reported once logging works.
fn filter() -> (EnvFilter, Option<(&'static str, String, String)>) {
    for var in ["INGOT_LOG", "RUST_LOG"] {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        if value.trim().is_empty() {
            continue;
        }
        return match EnvFilter::try_new(&value) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some((var, value, e.to_string())),
            ),
        };
    }
    (EnvFilter::new(DEFAULT_FILTER), None)
}
