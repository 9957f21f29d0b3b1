//! The plumbing of `Attach`: copies of the container's output for attached readers, and the one
//! attached writer's input copied into the container's stdin.
//!
//! Nothing here may block the monitor: every fd is non-blocking, a reader gets a bounded buffer
//! ([`ATTACH_BUFFER`]) and is cut off when it falls further behind, and input is read only as
//! fast as the container's stdin takes it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use api::shim::ATTACH_BUFFER;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Input bytes read ahead of what the container's stdin has taken.
const STDIN_BUFFER: usize = 64 * 1024;

/// One attached reader of one output stream (a pipe write end berthd passed).
#[derive(Debug)]
pub struct Sink {
    stream: &'static str,
    file: File,
    buf: VecDeque<u8>,
    /// Why it is being dropped, once it is.
    dead: Option<&'static str>,
}

impl Sink {
    /// A reader of `stream` (`stdout` or `stderr`); makes `fd` non-blocking.
    pub fn new(fd: OwnedFd, stream: &'static str) -> Sink {
        let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        Sink {
            stream,
            file: File::from(fd),
            buf: VecDeque::new(),
            dead: None,
        }
    }

    /// The stream it reads.
    pub fn stream(&self) -> &'static str {
        self.stream
    }

    /// Its fd, for poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Output waits in its buffer (poll for writability).
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Why it must be dropped, if it must.
    pub fn dead(&self) -> Option<&'static str> {
        self.dead
    }

    /// Marks it for dropping.
    pub fn kill(&mut self, why: &'static str) {
        self.dead.get_or_insert(why);
        self.buf = VecDeque::new();
    }

    /// Queues `data` behind what is buffered and writes what the pipe takes now. A reader whose
    /// buffer would pass [`ATTACH_BUFFER`] is marked dead instead.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.dead.is_some() {
            return;
        }
        self.flush();
        if self.buf.is_empty() {
            match write_some(&mut self.file, data) {
                Ok(n) => data = &data[n..],
                Err(()) => return self.kill("the attached reader closed its pipe"),
            }
        }
        if self.buf.len() + data.len() > ATTACH_BUFFER {
            self.kill("the attached reader fell behind");
        } else {
            self.buf.extend(data);
        }
    }

    /// Writes buffered output while the pipe takes it.
    pub fn flush(&mut self) {
        while self.dead.is_none() && !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match write_some(&mut self.file, front) {
                Ok(0) => return,
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(()) => self.kill("the attached reader closed its pipe"),
            }
        }
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = VecDeque::new();
        }
    }
}

/// Writes as much of `data` as `file` takes now; `Err` once its reader is gone.
fn write_some(file: &mut File, data: &[u8]) -> Result<usize, ()> {
    let mut done = 0;
    while done < data.len() {
        match file.write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    Ok(done)
}

/// The attached writer: its input (a pipe read end berthd passed) goes into the container's
/// stdin.
#[derive(Debug)]
pub struct StdinCopy {
    src: File,
    buf: Vec<u8>,
    eof: bool,
    /// At end of input, close the container's stdin.
    pub close_on_eof: bool,
}

/// How a [`StdinCopy`] is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Still copying.
    Going,
    /// Its input ended and everything was written.
    Ended,
    /// The container's stdin refused a write (closed by the container, or it exited).
    Broken,
}

impl StdinCopy {
    /// Copies what `fd` yields; makes it non-blocking.
    pub fn new(fd: OwnedFd, close_on_eof: bool) -> StdinCopy {
        let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        StdinCopy {
            src: File::from(fd),
            buf: Vec::new(),
            eof: false,
            close_on_eof,
        }
    }

    /// Its input fd, for poll.
    pub fn src(&self) -> BorrowedFd<'_> {
        self.src.as_fd()
    }

    /// Poll the input for readability.
    pub fn wants_read(&self) -> bool {
        !self.eof && self.buf.len() < STDIN_BUFFER
    }

    /// Poll the container's stdin for writability.
    pub fn wants_write(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Moves what can be moved now from the input into `target` (non-blocking).
    pub fn pump(&mut self, target: &mut File) -> Pump {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut progress = false;
            if self.wants_read() {
                let room = (STDIN_BUFFER - self.buf.len()).min(chunk.len());
                match self.src.read(&mut chunk[..room]) {
                    Ok(0) => {
                        self.eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => progress = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.eof = true;
                        progress = true;
                    }
                }
            }
            while !self.buf.is_empty() {
                match target.write(&self.buf) {
                    Ok(n) => {
                        self.buf.drain(..n);
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return Pump::Broken,
                }
            }
            if self.eof && self.buf.is_empty() {
                return Pump::Ended;
            }
            if !progress {
                return Pump::Going;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe")
    }

    fn drain(r: &mut File) -> Vec<u8> {
        let _ = fcntl(&*r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn a_slow_reader_is_buffered_then_cut_off() {
        let (r, w) = pipe();
        let mut r = File::from(r);
        let mut sink = Sink::new(w, "stdout");
        let chunk = vec![b'x'; 64 * 1024];
        sink.feed(&chunk[..10]);
        assert!(!sink.pending(), "an empty pipe takes it at once");
        assert_eq!(drain(&mut r).len(), 10);
        // The pipe (64 KiB) fills, then the buffer; the next chunk would pass the bound.
        let mut fed = 0;
        while sink.dead().is_none() {
            sink.feed(&chunk);
            fed += chunk.len();
            assert!(fed < 4 * ATTACH_BUFFER, "never cut off");
        }
        assert!(fed > ATTACH_BUFFER);
        assert!(!sink.pending());
    }

    #[test]
    fn buffered_output_is_written_in_order() {
        let (r, w) = pipe();
        let mut r = File::from(r);
        let mut sink = Sink::new(w, "stdout");
        let mut want = Vec::new();
        for i in 0..200u32 {
            let line = format!("{i:05}{}\n", "y".repeat(1000));
            want.extend_from_slice(line.as_bytes());
            sink.feed(line.as_bytes());
        }
        assert!(sink.pending());
        let mut got = Vec::new();
        while sink.pending() {
            got.extend(drain(&mut r));
            sink.flush();
        }
        got.extend(drain(&mut r));
        assert_eq!(got, want);
        assert!(sink.dead().is_none());
    }

    #[test]
    fn a_reader_that_closed_its_pipe_is_dropped() {
        let (r, w) = pipe();
        let mut sink = Sink::new(w, "stderr");
        drop(r);
        sink.feed(b"hello\n");
        assert!(sink.dead().is_some());
    }

    #[test]
    fn stdin_is_copied_until_eof() {
        let (src_r, src_w) = pipe();
        let (dst_r, dst_w) = pipe();
        let mut copy = StdinCopy::new(src_r, true);
        let mut target = File::from(dst_w);
        let _ = fcntl(&target, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        let mut src_w = File::from(src_w);
        src_w.write_all(b"abc").expect("write");
        assert_eq!(copy.pump(&mut target), Pump::Going);
        drop(src_w);
        assert_eq!(copy.pump(&mut target), Pump::Ended);
        assert_eq!(drain(&mut File::from(dst_r)), b"abc");
    }

    #[test]
    fn a_closed_container_stdin_breaks_the_copy() {
        let (src_r, src_w) = pipe();
        let (dst_r, dst_w) = pipe();
        let mut copy = StdinCopy::new(src_r, false);
        let mut target = File::from(dst_w);
        drop(dst_r);
        File::from(src_w).write_all(b"abc").expect("write");
        assert_eq!(copy.pump(&mut target), Pump::Broken);
    }
}
