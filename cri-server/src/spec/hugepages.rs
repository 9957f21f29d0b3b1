//! Hugepage sizes: the CRI's `page_size` strings mapped to the names the kernel gives its
//! hugetlb cgroup files (`hugetlb.<name>.max` on cgroup v2, `hugetlb.<name>.limit_in_bytes`
//! on v1).
//!
//! kubelet sends `2MB`, `1GB` (binary multiples, runc's spelling), which are also the kernel's
//! names; other clients write `2Mi`, `2M`, `2048kB` or a byte count. The kernel names a size by
//! its largest whole unit (`mem_fmt` in `mm/hugetlb_cgroup.c`): `64KB`, `2MB`, `32MB`, `1GB`.
//! A size the kernel has no pool for has no cgroup file, so it is refused here.

use std::path::Path;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The kernel's hugepage sizes in KiB, from the `hugepages-<n>kB` entries of `dir`
/// (`/sys/kernel/mm/hugepages`); empty when it cannot be read.
pub fn kernel_sizes_kb(dir: &Path) -> Vec<u64> {
    let mut sizes: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name();
                    let n = name
                        .to_str()?
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?;
                    n.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    sizes.sort_unstable();
    sizes
}

/// The size a CRI `page_size` means, in bytes: a whole number with an optional binary unit
/// (`B`, `K`/`KB`/`Ki`/`KiB`, `M…`, `G…`, `T…`; any case).
pub fn parse_page_size(page_size: &str) -> Option<u64> {
    let s = page_size.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let num: u64 = num.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => KIB,
        "m" | "mb" | "mi" | "mib" => MIB,
        "g" | "gb" | "gi" | "gib" => GIB,
        "t" | "tb" | "ti" | "tib" => 1024 * GIB,
        _ => return None,
    };
    num.checked_mul(mult).filter(|&b| b > 0)
}

/// The kernel's name of a hugepage size given in KiB: its largest whole unit.
pub fn kernel_name(size_kb: u64) -> String {
    let bytes = size_kb * KIB;
    if bytes >= GIB {
        format!("{}GB", bytes / GIB)
    } else if bytes >= MIB {
        format!("{}MB", bytes / MIB)
    } else {
        format!("{size_kb}KB")
    }
}

/// The kernel's name for the CRI `page_size`, if the kernel has that size (`sizes_kb`, from
/// [`kernel_sizes_kb`]); `None` for sizes it lacks or strings that are no size.
pub fn kernel_page_size(page_size: &str, sizes_kb: &[u64]) -> Option<String> {
    let bytes = parse_page_size(page_size)?;
    if bytes % KIB != 0 {
        return None;
    }
    let kb = bytes / KIB;
    sizes_kb.contains(&kb).then(|| kernel_name(kb))
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: [u64; 2] = [2048, 1_048_576];

    #[test]
    fn cri_sizes_map_to_kernel_names() {
        for (cri, kernel) in [
            ("2MB", "2MB"),
            ("2Mi", "2MB"),
            ("2M", "2MB"),
            ("2MiB", "2MB"),
            ("2mb", "2MB"),
            ("2048kB", "2MB"),
            ("2048KB", "2MB"),
            ("2097152", "2MB"),
            ("2097152B", "2MB"),
            ("1GB", "1GB"),
            ("1Gi", "1GB"),
            ("1024MB", "1GB"),
            (" 1G ", "1GB"),
        ] {
            assert_eq!(
                kernel_page_size(cri, &X86).as_deref(),
                Some(kernel),
                "{cri}"
            );
        }
    }

    #[test]
    fn sizes_the_kernel_lacks_or_garbage_are_refused() {
        for bad in [
            "", "MB", "0MB", "4MB", "64KB", "1TB", "2XB", "2 MB", "-2MB", "2.0MB", "2MBB", "1536B",
        ] {
            assert_eq!(kernel_page_size(bad, &X86), None, "{bad:?}");
        }
        assert_eq!(kernel_page_size("2MB", &[]), None, "no hugepage pools");
    }

    #[test]
    fn kernel_names_use_the_largest_whole_unit() {
        // arm64 with 64 KiB base pages: 64KB, 2MB, 32MB, 512MB, 16GB.
        assert_eq!(kernel_name(64), "64KB");
        assert_eq!(kernel_name(2048), "2MB");
        assert_eq!(kernel_name(32 * 1024), "32MB");
        assert_eq!(kernel_name(512 * 1024), "512MB");
        assert_eq!(kernel_name(16 * 1024 * 1024), "16GB");
        assert_eq!(kernel_page_size("64KiB", &[64]).as_deref(), Some("64KB"));
        assert_eq!(
            kernel_page_size("16Gi", &[16 << 20]).as_deref(),
            Some("16GB")
        );
    }

    #[test]
    fn sizes_are_read_from_sysfs_entries() {
        let dir = tempfile::tempdir().expect("tmp");
        for d in ["hugepages-1048576kB", "hugepages-2048kB", "other"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        assert_eq!(kernel_sizes_kb(dir.path()), vec![2048, 1_048_576]);
        assert!(kernel_sizes_kb(&dir.path().join("missing")).is_empty());
    }
}
