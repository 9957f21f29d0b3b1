//! Pod networking for berth: the CNI runtime side and berth's own plugins.
//!
//! - [`runtime`]: what berthd uses to run CNI plugins (spec 1.0/1.1): loads conflists from the
//!   conf dirs, runs plugin chains (ADD, DEL, CHECK, STATUS, GC, VERSION) with `prevResult`
//!   chaining, `CNI_ARGS` and `runtimeConfig` capabilities, and caches results on disk so DEL
//!   works after a restart.
//! - [`plugins`]: the code of berth's own plugin binaries (`berth-host-local`, `berth-bridge`,
//!   `berth-portmap`, `berth-vxlan`), written on `rscni-plugin`; each binary in `src/bin/` is a
//!   thin main over it.
#![warn(missing_docs)]

pub mod plugins;
pub mod runtime;
