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

/// How a setting is given.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A switch: `true` or `false`.
    Switch,
    /// One value.
    Value,
    /// A list (`nbd`, `iscsi`): an array, or one value.
    List,
}

/// `serve`'s options that a file may set: every long option but `--config` itself.
fn serve_options() -> Vec<(String, Kind)> {
    let cmd = crate::Cli::command();
    let Some(serve) = cmd.find_subcommand("serve") else {
        return Vec::new();
    };
    serve
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let kind = match a.get_action() {
                clap::ArgAction::Append => Kind::List,
                action if action.takes_values() => Kind::Value,
                _ => Kind::Switch,
            };
            (long != "config" && long != "help").then(|| (long.to_string(), kind))
        })
        .collect()
}

/// The top-level options that take a value (they may come before the subcommand).
fn global_options_with_values() -> Vec<String> {
    crate::Cli::command()
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter_map(|a| a.get_long().map(str::to_string))
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
        let Some(&(_, kind)) = known.iter().find(|(k, _)| k == key) else {
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
        match (kind, value) {
            (Kind::Switch, toml::Value::Boolean(b)) => {
                if *b {
                    args.push(flag);
                }
            }
            (Kind::Switch, other) => bail!(
                "{}:{line}: `{key}` is a switch: true or false, not {}",
                path.display(),
                other.type_str()
            ),
            // A list on the command line replaces the file's.
            (Kind::List, _) if given.iter().any(|g| g == key) => {}
            (Kind::List, toml::Value::Array(items)) => {
                for v in items {
                    args.push(flag.clone());
                    args.push(scalar(v)?);
                }
            }
            (Kind::Value, toml::Value::Array(_)) => bail!(
                "{}:{line}: `{key}` takes one value, not a list",
                path.display()
            ),
            (Kind::Value | Kind::List, v) => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

/// The command line with `serve`'s configuration file, if any, put in: the file's arguments
/// right after `serve`, before the command line's own.
pub fn expand(argv: Vec<String>) -> Result<Vec<String>> {
    // The subcommand is the first word that is neither an option nor the value of a global
    // option given before it (`ingot --log-format json serve ...`).
    let globals = global_options_with_values();
    let mut at = 1;
    while let Some(a) = argv.get(at) {
        if !a.starts_with('-') {
            break;
        }
        let takes_value = a
            .strip_prefix("--")
            .is_some_and(|long| !long.contains('=') && globals.iter().any(|g| g == long));
        at += if takes_value { 2 } else { 1 };
    }
    if argv.get(at).is_none_or(|a| a != "serve") {
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
