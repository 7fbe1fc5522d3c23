//! Progress lines of long operations (check, gc, import), and the stderr writer that log lines
//! go through so that the two never run into each other.
//!
//! A progress line is drawn only when stderr is a terminal: in a pipe or a log file the `\r`
//! redraws would be noise. While one is on the screen, a log line first clears it, then prints,
//! then draws it again below; one lock orders the two (engine threads log concurrently).

use std::fmt::Display;
use std::io::{self, IsTerminal, Write};
use std::sync::{Mutex, MutexGuard};

/// Back to the start of the line and erase it.
const CLEAR: &str = "\r\x1b[2K";

/// The progress line now on the screen, if any.
static SHOWN: Mutex<Option<String>> = Mutex::new(None);

fn shown() -> MutexGuard<'static, Option<String>> {
    SHOWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// One operation's progress line.
pub struct Progress {
    tty: bool,
    drawn: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Replace the line with `text` (formatted only when it is drawn at all).
    pub fn draw(&mut self, text: impl Display) {
        if !self.tty {
            return;
        }
        let text = text.to_string();
        let mut shown = shown();
        let mut err = io::stderr().lock();
        let _ = write!(err, "{CLEAR}{text}");
        let _ = err.flush();
        *shown = Some(text);
        self.drawn = true;
    }

    /// Leave the last line on the screen and move below it.
    pub fn finish(&mut self) {
        if !self.drawn {
            return;
        }
        self.drawn = false;
        if shown().take().is_some() {
            let _ = writeln!(io::stderr());
        }
    }
}

impl Drop for Progress {
    /// An operation that failed half-way must not leave the cursor on its progress line.
    fn drop(&mut self) {
        self.finish();
    }
}

/// A log record to stderr, written out whole when dropped (tracing-subscriber writes each
/// record through a fresh one).
#[derive(Default)]
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let shown = shown();
        // Errors are dropped: there is nowhere left to report a failing stderr.
        let _ = emit(&mut io::stderr().lock(), shown.as_deref(), &self.0);
    }
}

/// Write `record` under the progress line `shown`: clear it, write, draw it again.
fn emit(err: &mut dyn Write, shown: Option<&str>, record: &[u8]) -> io::Result<()> {
    if let Some(line) = shown {
        err.write_all(CLEAR.as_bytes())?;
        err.write_all(record)?;
        err.write_all(line.as_bytes())?;
    } else {
        err.write_all(record)?;
    }
    err.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_record_goes_above_the_progress_line() {
        let mut out = Vec::new();
        emit(&mut out, Some("checking blocks: 1/2"), b"WARN x\n").unwrap();
        assert_eq!(out, b"\r\x1b[2KWARN x\nchecking blocks: 1/2");
        let mut out = Vec::new();
        emit(&mut out, None, b"WARN x\n").unwrap();
        assert_eq!(out, b"WARN x\n");
    }
}
