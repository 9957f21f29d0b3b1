//! Keeping the monitor's resident set small.
//!
//! RSS counts every page mapped in the process, including clean pages of the binary and libc
//! that are shared with every other shim through the page cache. Two things inflate it: code
//! that ran once during startup and creation, and the kernel's fault-around (a fault maps up to
//! 16 cached neighbours of the page touched; `MADV_RANDOM` does not turn it off on 6.x kernels).
//! Neither costs memory of its own, but both count against the 2 MiB budget, so the shim drops
//! the startup pages before it goes idle.

/// Unmaps the clean pages of read-only file mappings (code, read-only data): they come back
/// from the page cache when touched again. Mappings holding private (relocated or written)
/// pages are left alone, as `MADV_DONTNEED` would discard those.
pub fn drop_clean_file_pages() {
    for m in file_mappings() {
        if !m.writable && m.anonymous_kb == 0 {
            // SAFETY: the mapping is read-only and holds no private page, so dropping its page
            // table entries loses nothing: later accesses refault the same file contents.
            unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
        }
    }
}

struct Mapping {
    start: usize,
    len: usize,
    writable: bool,
    anonymous_kb: u64,
}

/// Mappings of files (path starting with `/`), from `/proc/self/smaps`.
fn file_mappings() -> Vec<Mapping> {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return Vec::new();
    };
    let mut out: Vec<Mapping> = Vec::new();
    let mut current_is_file = false;
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Anonymous:") {
            if current_is_file && let Some(m) = out.last_mut() {
                m.anonymous_kb = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(1);
            }
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            // A "Key: value" line.
            continue;
        };
        current_is_file = f.nth(3).is_some_and(|p| p.starts_with('/')) && hi > lo;
        if current_is_file {
            out.push(Mapping {
                start: lo,
                len: hi - lo,
                writable: perms.contains('w'),
                // Until the Anonymous line says otherwise, assume private pages.
                anonymous_kb: 1,
            });
        }
    }
    out
}
