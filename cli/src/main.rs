//! `ingot`: create pools, manage volumes, serve them over NBD, and check them.
//!
//! This file holds the top-level command line, `main` and error reporting; each command family
//! lives in `cmd/`.

/// The engine's buffers and replies are allocated on one thread and freed on another
/// (connection, shard, writer); glibc's malloc spent 11% of the shards' time there, and 4k
/// random writes in-process ran 40% faster with mimalloc (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// First: `out!`/`outln!` are seen only by the modules declared after it.
#[macro_use]
mod out;

mod access;
mod cmd;
mod config;
mod control;
mod logging;
mod metrics;
mod notify;
mod progress;
mod size;
mod store;

use anyhow::Result;
use clap::CommandFactory;
use clap::{Parser, Subcommand};

use cmd::serve::{AccessArgs, IscsiArgs, NbdArgs, RunArgs};
use cmd::PoolArg;
use logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "ingot",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("INGOT_COMMIT"), ")"),
    about = "A log-structured, all-flash block store served over NBD",
    after_help = "Examples:\n  \
        ingot serve    # serves ./ingot-data on 127.0.0.1:10809, creating it if missing\n  \
        ingot volume create pgdata --size 100G --pool /var/lib/ingot/ingot-data\n  \
        ingot stats --pool /var/lib/ingot/ingot-data"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format on stderr (level: INGOT_LOG or RUST_LOG, default info).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "INGOT_LOG_FORMAT",
        default_value_t = LogFormat::Human
    )]
    log_format: LogFormat,
}

// Parsed once per run: the size of `Serve`'s settings costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create or inspect pools.
    #[command(after_help = "Examples:\n  \
        ingot pool create --pool /var/lib/ingot/ingot-data --size 500G")]
    Pool {
        #[command(subcommand)]
        cmd: cmd::pool::PoolCmd,
    },
    /// Serve every volume of a pool over NBD (creates a default pool in an empty directory).
    #[command(
        args_override_self = true,
        after_help = "Examples:\n  \
        ingot serve --nbd 0.0.0.0:10809 --nbd unix:/run/ingot/nbd.sock\n  \
        ingot serve --config /etc/ingot/ingot.toml\n  \
        ingot serve --pool /var/lib/ingot/ingot-data --iscsi 0.0.0.0 --metrics 127.0.0.1:9750"
    )]
    Serve {
        /// Settings file (TOML; keys are these long options, e.g. `cache-size = "4G"`); options
        /// given here override it. Default: /etc/ingot/ingot.toml when it exists.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        pool: PoolArg,
        /// NBD listener: HOST:PORT, [::1]:PORT or unix:PATH (repeatable).
        #[arg(long = "nbd")]
        nbd: Vec<String>,
        /// Serve every export read-only.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        store: store::ServeStoreArgs,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics.
        #[arg(long)]
        metrics: Option<String>,
        #[command(flatten)]
        nbd_opts: NbdArgs,
        #[command(flatten)]
        access: AccessArgs,
        #[command(flatten)]
        iscsi: IscsiArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Create, list, resize and delete volumes.
    #[command(after_help = "Examples:\n  \
        ingot volume create pgdata --size 100G --pool /var/lib/ingot/ingot-data\n  \
        ingot volume list --pool /var/lib/ingot/ingot-data")]
    Volume {
        #[command(subcommand)]
        cmd: cmd::volume::VolumeCmd,
    },
    /// Capacity, usage and I/O counters.
    #[command(after_help = "Examples:\n  \
        ingot stats --pool /var/lib/ingot/ingot-data\n  \
        ingot stats --json | jq .data_reduction_ratio\n  \
        ingot stats --prometheus > /var/lib/node_exporter/textfile/ingot.prom")]
    Stats {
        #[command(flatten)]
        pool: PoolArg,
        /// Print one JSON object.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print Prometheus text format.
        #[arg(long)]
        prometheus: bool,
    },
    /// Clean now: rewrite the live data of partly dead segments so their space comes back.
    #[command(after_help = "Examples:\n  \
        ingot gc --pool /var/lib/ingot/ingot-data\n  \
        ingot gc --max-utilisation 0.5 --json")]
    Gc {
        #[command(flatten)]
        pool: PoolArg,
        /// Clean segments at most this full (0.0-1.0).
        #[arg(long, default_value_t = 0.9)]
        max_utilisation: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every block checksum and the pool's invariants; non-zero exit on any problem.
    #[command(after_help = "Examples:\n  \
        ingot check --pool /var/lib/ingot/ingot-data\n  \
        ingot check --json > check-report.json")]
    Check {
        #[command(flatten)]
        pool: PoolArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a settings file for `serve --config`.
    #[command(after_help = "Examples:\n  \
        ingot config check /etc/ingot/ingot.toml")]
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        ingot completions bash > /etc/bash_completion.d/ingot\n  \
        ingot completions zsh > ~/.zfunc/_ingot\n  \
        ingot completions fish > ~/.config/fish/completions/ingot.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one per command into DIR.
    #[command(after_help = "Examples:\n  \
        ingot man | man -l -\n  \
        ingot man --dir /usr/local/share/man/man1")]
    Man {
        /// Write ingot.1 and ingot-COMMAND.1 pages here instead.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse FILE, refuse unknown keys (naming the key and its line), and check every value as
    /// `serve` would.
    #[command(after_help = "Examples:\n  \
        ingot config check /etc/ingot/ingot.toml\n  \
        ingot config check ./ingot.toml")]
    Check { file: std::path::PathBuf },
}

/// No transparent huge pages for this process. The engine's buffers come and go by the
/// megabyte, and on a huge page the first touch of a fresh one zeroes 2 MiB: that zeroing
/// was 44% of the shards' CPU in `ingot-bench db-batch`, and the server's system time fell
/// from 1.0-1.1 s to 0.4-0.5 s a run without it (docs/benchmarks.md). mimalloc is built
/// without its huge-page advice (`no_thp`), which is enough where THP is `madvise`; this also
/// covers hosts where it is `always`.
fn tune_allocator() {
    let one: libc::c_ulong = 1;
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and changes only this process (and
    // what it would exec: `ingot` starts no other program).
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, one, zero, zero, zero) };
    if rc != 0 {
        // Not fatal: only slower (the first touch of each fresh huge page zeroes 2 MiB).
        eprintln!(
            "ingot: could not turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

unsafe extern "C" {
    /// mimalloc's `mi_collect`, linked in with the allocator (the `mimalloc` crate binds it only
    /// with its `extended` feature).
    fn mi_collect(force: bool);
}

/// Give the memory freed while the pool opened back to the system. Decoding a checkpoint holds
/// the pool's metadata several times over for a moment (621 MB at the peak for 3.1 M blocks,
/// 174 MB live once open), and mimalloc hands freed memory back only when later allocations
/// come by, which a server idle after opening does not make: it kept 660 MB.
pub(crate) fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointer; it frees only pages that hold no live allocation.
    unsafe { mi_collect(true) }
}

fn main() {
    tune_allocator();
    // `serve`'s settings file becomes arguments before the command line's own.
    let argv = match config::expand(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ingot: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    logging::init(cli.log_format);
    let code = match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            // The command's final word, not a log line: plain text whatever --log-format says.
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "ingot: {e:#}");
            if let Some(hint) = hint(&e) {
                let _ = writeln!(err, "hint: {hint}");
            }
            1
        }
    };
    std::process::exit(out::finish(code));
}

/// What to do about an engine error, in the CLI's own words (the engine names no command).
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use ingot_engine::Error as E;
    let e = e.chain().find_map(|c| c.downcast_ref::<E>())?;
    Some(match e {
        E::Locked { .. } | E::DeviceInUse { .. } => {
            "is `ingot serve` running on this pool or one that uses the device?"
        }
        E::DeviceHoldsData { .. } => "pass --force to destroy what it holds",
        E::NotAPool { .. } => "create one with `ingot pool create`",
        _ => return None,
    })
}

fn run(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Pool { cmd } => cmd::pool::run(cmd),
        Cmd::Serve {
            config: _,
            pool,
            nbd,
            read_only,
            metrics,
            nbd_opts,
            access,
            iscsi,
            run,
            store,
        } => cmd::serve::serve(
            &pool.pool, nbd, read_only, &store, metrics, &nbd_opts, &access, &iscsi, &run,
        ),
        Cmd::Volume { cmd } => cmd::volume::run(cmd),
        Cmd::Stats {
            pool,
            json,
            prometheus,
        } => cmd::maint::stats(&pool.pool, json, prometheus),
        Cmd::Check { pool, json } => cmd::maint::check(&pool.pool, json),
        Cmd::Gc {
            pool,
            max_utilisation,
            json,
        } => cmd::maint::gc(&pool.pool, max_utilisation, json),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => config::check(&file),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ingot", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(0)
        }
        Cmd::Man { dir } => man(dir.as_deref()),
    }
}

/// The man pages, generated from the command definitions (so they cannot drift from `--help`).
fn man(dir: Option<&std::path::Path>) -> Result<i32> {
    use anyhow::Context;
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        out!("{}", String::from_utf8_lossy(&page));
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut pages = vec![("ingot".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((format!("ingot-{}", sub.get_name()), sub.clone()));
    }
    for (name, c) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(c)
            .title(name.clone())
            .render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}
