//! Standard output, for every command: a reader that goes away (`cxrgen info | head`) is not an
//! error. Once the pipe is closed, writes are dropped and the command finishes normally.

use std::io::{self, Write};

/// Standard output, locked for the command's results.
pub struct Stdout {
    inner: io::StdoutLock<'static>,
    closed: bool,
}

impl Stdout {
    pub fn lock() -> Self {
        Self {
            inner: io::stdout().lock(),
            closed: false,
        }
    }

    /// Whether the reader has gone (nothing more will be read).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// A broken pipe marks the output closed and counts as written; other errors stay errors.
    fn absorb<T>(&mut self, result: io::Result<T>, written: T) -> io::Result<T> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(written)
            }
            other => other,
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.absorb(result, buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.inner.flush();
        self.absorb(result, ())
    }
}
