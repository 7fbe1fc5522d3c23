//! Standard output of the commands. `println!` panics when the reader went away (`ingot volume
//! list | head -1`); these macros stop writing instead and let the command finish as it would
//! have, so a pool opened here is still shut down cleanly.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The reader closed its end: whatever else the command prints is dropped.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// The first other write error (a full disk under a redirect), reported when the command ends.
static FAILED: Mutex<Option<io::Error>> = Mutex::new(None);

/// `print!` to stdout, quietly stopping once stdout is closed.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// `println!` to stdout, quietly stopping once stdout is closed.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub fn write(args: fmt::Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        note(e);
    }
}

/// Push out what is buffered (stdout is line-buffered; `out!` may leave a partial line).
pub fn flush() {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = io::stdout().lock().flush() {
        note(e);
    }
}

fn note(e: io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        CLOSED.store(true, Ordering::Relaxed);
        return;
    }
    let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    failed.get_or_insert(e);
}

/// The exit status once the command returned `code`: a write error other than a closed pipe
/// fails a command that had succeeded, since its output is incomplete.
pub fn finish(code: i32) -> i32 {
    flush();
    let failed = FAILED.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(e) => {
            let _ = writeln!(io::stderr(), "ingot: writing to standard output: {e}");
            if code == 0 {
                1
            } else {
                code
            }
        }
        None => code,
    }
}
