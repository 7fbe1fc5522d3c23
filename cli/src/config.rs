//! `ingot serve --config FILE`: a TOML file whose keys are `serve`'s long options, e.g.
//!
//! ```toml
//! pool = "/var/lib/ingot"
//! nbd = ["0.0.0.0:10809", "unix:/run/ingot/nbd.sock"]
//! cache-size = "4G"
//! tls-required = true
//! ```
//!
//! The file's settings become arguments placed before the command line's, so a flag given on
//! the command line overrides the file; a list (`nbd`, `iscsi`) given on the command line
//! replaces the file's. Unknown keys are errors naming the key and its line.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::CommandFactory;

/// Read when `--config` is not given and it exists.
pub const DEFAULT_CONFIG: &str = "/etc/ingot/ingot.toml";

/// `serve`'s options that a file may set: every long option but `--config` itself.
fn serve_options() -> Vec<(String, bool)> {
    let cmd = crate::Cli::command();
    let Some(serve) = cmd.find_subcommand("serve") else {
        return Vec::new();
    };
    serve
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let takes_value = a.get_action().takes_values();
            (long != "config" && long != "help").then(|| (long.to_string(), takes_value))
        })
        .collect()
}

/// The line of `text` where `key` is set, for error messages.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// The arguments `path` stands for, in file order; `given` holds the long options the
/// command line gives (its lists replace the file's).
pub fn arguments(path: &Path, given: &[String]) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
    let known = serve_options();
    let mut args = Vec::new();
    for (key, value) in &table {
        let line = line_of(&text, key);
        let Some((_, takes_value)) = known.iter().find(|(k, _)| k == key) else {
            bail!(
                "{}:{line}: unknown key `{key}` (the keys are serve's long options: {})",
                path.display(),
                known
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => bail!(
                    "{}:{line}: `{key}` takes a string or a number, not {}",
                    path.display(),
                    other.type_str()
                ),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    args.push(flag);
                }
            }
            toml::Value::Array(items) if *takes_value => {
                if given.iter().any(|g| g == key) {
                    continue;
                }
                for v in items {
                    args.push(flag.clone());
                    args.push(scalar(v)?);
                }
            }
            v if *takes_value => {
                args.push(flag);
                args.push(scalar(v)?);
            }
            other => bail!(
                "{}:{line}: `{key}` is a switch: true or false, not {}",
                path.display(),
                other.type_str()
            ),
        }
    }
    Ok(args)
}

/// The command line with `serve`'s configuration file, if any, put in: the file's arguments
/// right after `serve`, before the command line's own.
pub fn expand(argv: Vec<String>) -> Result<Vec<String>> {
    // `serve` is the first word that is not an option (global options may come before it).
    let Some(at) = argv
        .iter()
        .skip(1)
        .position(|a| !a.starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(argv);
    };
    if argv[at] != "serve" {
        return Ok(argv);
    }
    let rest = &argv[at + 1..];
    let mut config: Option<PathBuf> = None;
    let mut given = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let a = &rest[i];
        if let Some(v) = a.strip_prefix("--config=") {
            config = Some(v.into());
        } else if a == "--config" {
            config = rest.get(i + 1).map(PathBuf::from);
        } else if let Some(long) = a.strip_prefix("--") {
            given.push(long.split('=').next().unwrap_or(long).to_string());
        }
        i += 1;
    }
    let path = match config {
        Some(p) => p,
        None if Path::new(DEFAULT_CONFIG).is_file() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(argv),
    };
    let from_file = arguments(&path, &given)?;
    let mut out = argv[..=at].to_vec();
    out.extend(from_file);
    out.extend(rest.iter().cloned());
    Ok(out)
}

/// `ingot config check FILE`: the file parses, every key is known, and `serve` accepts the
/// values.
pub fn check(path: &Path) -> Result<i32> {
    let args = arguments(path, &[])?;
    let argv = ["ingot".to_string(), "serve".to_string()]
        .into_iter()
        .chain(args.iter().cloned());
    match crate::Cli::command().try_get_matches_from(argv) {
        Ok(_) => {
            outln!(
                "{}: ok ({} settings)",
                path.display(),
                args.iter().filter(|a| a.starts_with("--")).count()
            );
            Ok(0)
        }
        Err(e) => bail!("{}: {}", path.display(), e.to_string().trim()),
    }
}
