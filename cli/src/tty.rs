//! The local terminal: raw mode for `-t` sessions and its window size.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use nix::sys::termios::{self, SetArg, Termios};

/// Whether our stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// Whether our stdout is a terminal.
pub fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

/// Raw mode on stdin until dropped; the saved settings are put back even when the session
/// ends in an error (the guard lives across the whole session).
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin's terminal in raw mode.
    pub fn enable() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd).context("read the terminal's settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).context("set the terminal raw")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// (rows, columns) of the terminal on `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The size of whichever of stdout or stdin is a terminal.
pub fn size() -> Option<(u16, u16)> {
    window_size(std::io::stdout().as_fd()).or_else(|| window_size(std::io::stdin().as_fd()))
}
