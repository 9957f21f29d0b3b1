//! `berth-host-local`: IPAM over configured ranges, with allocations kept on the host's disk.
//!
//! The on-disk layout is the reference host-local plugin's, so either plugin can release
//! what the other allocated: under `<dataDir>/<network name>/`, one file per allocated
//! address named by the address and holding `<container id>\r\n<ifname>`, a
//! `last_reserved_ip.<range set index>` file per range set (allocation resumes after it),
//! and a `lock` file that every operation holds an exclusive `flock` on.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error as CniError;
use rscni_plugin::types::{Args, CNIResult, IpConfig, NetConf, Route};
use serde::Deserialize;
use serde_json::Value;

use super::ipnet::{self, IpNet};
use super::{Error, Result, runner};

/// Where allocations are kept when the configuration names no `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";

/// One range of a range set as written in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    /// The subnet the addresses are in.
    pub subnet: IpNet,
    /// First address handed out (default: the subnet's second address).
    pub range_start: Option<IpAddr>,
    /// Last address handed out (default: the last address, before the IPv4 broadcast).
    pub range_end: Option<IpAddr>,
    /// The gateway, never handed out (default: the subnet's second address).
    pub gateway: Option<IpAddr>,
}

/// A route the IPAM result tells the interface plugin to install.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConf {
    /// Destination.
    pub dst: IpNet,
    /// Next hop (default: the interface plugin's choice, usually the gateway).
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpamSection {
    #[serde(default)]
    ranges: Vec<Vec<RangeConf>>,
    subnet: Option<IpNet>,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<RouteConf>,
    data_dir: Option<PathBuf>,
}

/// A range after defaults are applied: `start..=end` inside `subnet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet, host bits cleared; its prefix is the prefix of handed-out addresses.
    pub subnet: IpNet,
    /// First address handed out.
    pub start: IpAddr,
    /// Last address handed out.
    pub end: IpAddr,
    /// The gateway (never handed out).
    pub gateway: Option<IpAddr>,
}

impl Range {
    fn from_conf(conf: &RangeConf) -> Result<Self> {
        let subnet = conf.subnet.canonical();
        let bits = ipnet::bits(subnet.addr);
        if subnet.prefix > bits - 2 {
            return Err(Error::InvalidConfig(format!(
                "subnet {subnet} has too few addresses"
            )));
        }
        let second = ipnet::add(subnet.network(), 1).expect("a subnet of >= 4 addresses");
        let last = if subnet.addr.is_ipv4() {
            from_int(ipnet::to_u128(subnet.last()) - 1, &subnet)
        } else {
            subnet.last()
        };
        let start = conf.range_start.unwrap_or(second);
        let end = conf.range_end.unwrap_or(last);
        for (what, ip) in [("rangeStart", start), ("rangeEnd", end)] {
            if !subnet.contains(ip) {
                return Err(Error::InvalidConfig(format!(
                    "{what} {ip} is not in subnet {subnet}"
                )));
            }
        }
        if ipnet::to_u128(start) > ipnet::to_u128(end) {
            return Err(Error::InvalidConfig(format!(
                "rangeStart {start} is after rangeEnd {end}"
            )));
        }
        let gateway = conf.gateway.or(Some(second));
        if let Some(gw) = gateway
            && gw.is_ipv4() != subnet.addr.is_ipv4()
        {
            return Err(Error::InvalidConfig(format!(
                "gateway {gw} is not of the family of subnet {subnet}"
            )));
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    /// Whether `ip` is inside `start..=end`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = ipnet::to_u128(ip);
        ip.is_ipv4() == self.start.is_ipv4()
            && ipnet::to_u128(self.start) <= v
            && v <= ipnet::to_u128(self.end)
    }

    /// Whether `ip` may be handed out: not the gateway, the network or broadcast address.
    fn usable(&self, ip: IpAddr) -> bool {
        Some(ip) != self.gateway
            && ip != self.subnet.network()
            && !(ip.is_ipv4() && ip == self.subnet.last())
    }

    fn len(&self) -> u128 {
        ipnet::to_u128(self.end) - ipnet::to_u128(self.start) + 1
    }
}

fn from_int(v: u128, like: &IpNet) -> IpAddr {
    ipnet::from_u128(v, like.addr.is_ipv4())
}

/// The ranges one address per container is taken from (a container gets one address from
/// each range set of the network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    /// The range holding `ip`, if any.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    fn total(&self) -> Result<u128> {
        self.0.iter().try_fold(0u128, |acc, r| {
            acc.checked_add(r.len())
                .ok_or_else(|| Error::InvalidConfig(format!("range set {self} is too large")))
        })
    }

    /// Position of `ip` in the concatenation of the ranges.
    fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        let mut before = 0u128;
        for r in &self.0 {
            if r.contains(ip) {
                return Some(before + ipnet::to_u128(ip) - ipnet::to_u128(r.start));
            }
            before += r.len();
        }
        None
    }

    /// The address at `offset` in the concatenation of the ranges, with its range.
    fn at(&self, mut offset: u128) -> Option<(&Range, IpAddr)> {
        for r in &self.0 {
            if offset < r.len() {
                let ip = from_int(ipnet::to_u128(r.start) + offset, &r.subnet);
                return Some((r, ip));
            }
            offset -= r.len();
        }
        None
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}-{}", r.start, r.end)?;
        }
        Ok(())
    }
}

/// A host-local IPAM configuration, resolved from the network configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network name: the allocations directory under `data_dir`.
    pub network: String,
    /// The root of all networks' allocation directories.
    pub data_dir: PathBuf,
    /// Range sets; a container gets one address from each.
    pub range_sets: Vec<RangeSet>,
    /// Routes returned in the result.
    pub routes: Vec<RouteConf>,
    /// Addresses the runtime asked for (`CNI_ARGS` `IP=`, `runtimeConfig.ips`, `args.cni.ips`).
    pub requested: Vec<IpAddr>,
}

impl Config {
    /// Resolves the IPAM part of `conf`. `cni_args` is `CNI_ARGS` (for `IP=`).
    ///
    /// As in the reference plugin, `runtimeConfig.ipRanges` (the `ipRanges` capability) and
    /// the legacy single-range fields (`subnet`, `rangeStart`, `rangeEnd`, `gateway`) are
    /// range sets placed before those of `ranges`.
    pub fn from_netconf(conf: &NetConf, cni_args: Option<&str>) -> Result<Self> {
        let ipam = conf
            .ipam
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("no ipam section".into()))?;
        let section: IpamSection =
            serde_json::from_value(Value::Object(ipam.custom.clone().into_iter().collect()))
                .map_err(|e| Error::InvalidConfig(format!("ipam: {e}")))?;
        validate_network_name(&conf.name)?;

        let mut set_confs: Vec<Vec<RangeConf>> = Vec::new();
        if let Some(ranges) = conf
            .runtime_config
            .as_ref()
            .and_then(|rc| rc.custom.get("ipRanges"))
        {
            let ranges: Vec<Vec<RangeConf>> = serde_json::from_value(ranges.clone())
                .map_err(|e| Error::InvalidConfig(format!("runtimeConfig.ipRanges: {e}")))?;
            set_confs.extend(ranges.into_iter().filter(|s| !s.is_empty()));
        }
        if let Some(subnet) = section.subnet {
            set_confs.push(vec![RangeConf {
                subnet,
                range_start: section.range_start,
                range_end: section.range_end,
                gateway: section.gateway,
            }]);
        }
        set_confs.extend(section.ranges.into_iter().filter(|s| !s.is_empty()));
        if set_confs.is_empty() {
            return Err(Error::InvalidConfig(
                "ipam has no ranges and no subnet".into(),
            ));
        }

        let mut range_sets = Vec::new();
        for confs in &set_confs {
            let set = RangeSet(confs.iter().map(Range::from_conf).collect::<Result<_>>()?);
            set.total()?;
            range_sets.push(set);
        }
        let all: Vec<&Range> = range_sets.iter().flat_map(|s| s.0.iter()).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.contains(b.start) || a.contains(b.end) || b.contains(a.start) {
                    return Err(Error::InvalidConfig(format!(
                        "ranges {}-{} and {}-{} overlap",
                        a.start, a.end, b.start, b.end
                    )));
                }
            }
        }

        Ok(Config {
            network: conf.name.clone(),
            data_dir: section
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            range_sets,
            routes: section.routes,
            requested: requested_ips(conf, cni_args)?,
        })
    }

    /// The directory holding this network's allocations.
    pub fn dir(&self) -> PathBuf {
        self.data_dir.join(&self.network)
    }
}

fn validate_network_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::InvalidConfig(format!(
            "network name {name:?} cannot name a directory"
        )));
    }
    Ok(())
}

fn requested_ips(conf: &NetConf, cni_args: Option<&str>) -> Result<Vec<IpAddr>> {
    let mut raw: Vec<String> = Vec::new();
    for kv in cni_args.unwrap_or_default().split(';') {
        if let Some(("IP", v)) = kv.split_once('=') {
            raw.extend(v.split(',').map(str::to_string));
        }
    }
    let mut from_json = |v: Option<&Value>| {
        for s in v.and_then(Value::as_array).into_iter().flatten() {
            if let Some(s) = s.as_str() {
                raw.push(s.to_string());
            }
        }
    };
    from_json(
        conf.runtime_config
            .as_ref()
            .and_then(|rc| rc.custom.get("ips")),
    );
    from_json(
        conf.args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips")),
    );
    raw.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|_| Error::InvalidConfig(format!("requested IP {s:?} is not an address")))
        })
        .collect()
}

/// One allocation file: an address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The allocated address (the file name).
    pub ip: IpAddr,
    /// The holder's container id (first line).
    pub container_id: String,
    /// The holder's interface name (second line; empty in files of old plugin versions).
    pub ifname: String,
}

/// A network's allocation directory, held under its exclusive lock until dropped.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    // Holds the flock; closing the file (on drop) releases it.
    _lock: File,
}

impl Store {
    /// Creates the directory if needed and takes the lock (blocking).
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io("create allocation dir", dir, e))?;
        Self::lock(dir)
    }

    /// Takes the lock of an existing directory; `None` if the directory does not exist.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        match fs::metadata(dir) {
            Ok(_) => Self::lock(dir).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat allocation dir", dir, e)),
        }
    }

    fn lock(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;
        file.lock().map_err(|e| Error::io("lock", &path, e))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: file,
        })
    }

    /// Every allocation file in the directory.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| Error::io("list allocations", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list allocations", &self.dir, e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let data = match fs::read_to_string(&path) {
                Ok(data) => data,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read allocation", &path, e)),
            };
            let mut lines = data.trim().lines();
            out.push(Allocation {
                ip,
                container_id: lines.next().unwrap_or_default().trim().to_string(),
                ifname: lines.next().unwrap_or_default().trim().to_string(),
            });
        }
        Ok(out)
    }

    /// Records `ip` for the container; `false` if the address is already taken.
    fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool> {
        let path = self.dir.join(ip.to_string());
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(Error::io("create allocation", &path, e)),
        };
        // "\r\n" as the reference plugin writes it: its DEL compares the whole content.
        // An empty file left by a crash here holds the address for no valid attachment,
        // so GC releases it.
        file.write_all(format!("{container_id}\r\n{ifname}").as_bytes())
            .map_err(|e| Error::io("write allocation", &path, e))?;
        Ok(true)
    }

    fn release(&self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io("remove allocation", &path, e))
            }
            _ => Ok(()),
        }
    }

    fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}"));
        let tmp = self.dir.join(format!(".{LAST_RESERVED_PREFIX}{set}.tmp"));
        fs::write(&tmp, ip.to_string()).map_err(|e| Error::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename into place", &path, e))
    }
}

/// An address handed out by [`allocate`], with the range it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// Address and the subnet's prefix length.
    pub address: IpNet,
    /// The range's gateway.
    pub gateway: Option<IpAddr>,
}

/// Allocates one address from each range set for `(container_id, ifname)`.
///
/// An address the attachment already holds in a set is returned again (a repeated ADD is
/// idempotent). If any set fails, the addresses taken by this call are released.
pub fn allocate(conf: &Config, container_id: &str, ifname: &str) -> Result<Vec<Assigned>> {
    let store = Store::create(&conf.dir())?;
    let allocations = store.allocations()?;
    let taken: HashMap<IpAddr, &Allocation> = allocations.iter().map(|a| (a.ip, a)).collect();
    let mine = |a: &Allocation| a.container_id == container_id && a.ifname == ifname;

    for ip in &conf.requested {
        if !conf.range_sets.iter().any(|s| s.range_for(*ip).is_some()) {
            return Err(Error::RequestedIp(format!(
                "{ip} is not in any range of network {}",
                conf.network
            )));
        }
    }

    let mut assigned = Vec::new();
    let mut new = Vec::new();
    let result = (|| {
        for (idx, set) in conf.range_sets.iter().enumerate() {
            if let Some(a) = allocations
                .iter()
                .find(|a| mine(a) && set.range_for(a.ip).is_some())
            {
                assigned.push(assigned_for(set, a.ip));
                continue;
            }
            let ip = match conf
                .requested
                .iter()
                .find(|ip| set.range_for(**ip).is_some())
            {
                Some(&ip) => {
                    let usable = set.range_for(ip).is_some_and(|r| r.usable(ip));
                    if !usable
                        || taken.contains_key(&ip)
                        || !store.reserve(ip, container_id, ifname)?
                    {
                        return Err(Error::RequestedIp(format!(
                            "{ip} is not available in range set {set}"
                        )));
                    }
                    ip
                }
                None => next_free(&store, idx, set, &taken, container_id, ifname)?,
            };
            new.push(ip);
            store.set_last_reserved(idx, ip)?;
            assigned.push(assigned_for(set, ip));
        }
        Ok(())
    })();
    if let Err(err) = result {
        for ip in new {
            let _ = store.release(ip);
        }
        return Err(err);
    }
    Ok(assigned)
}

fn assigned_for(set: &RangeSet, ip: IpAddr) -> Assigned {
    let range = set.range_for(ip).expect("ip was found in this set");
    Assigned {
        address: IpNet {
            addr: ip,
            prefix: range.subnet.prefix,
        },
        gateway: range.gateway,
    }
}

/// Round-robin: the first free usable address after the set's last reserved one.
fn next_free(
    store: &Store,
    idx: usize,
    set: &RangeSet,
    taken: &HashMap<IpAddr, &Allocation>,
    container_id: &str,
    ifname: &str,
) -> Result<IpAddr> {
    let total = set.total()?;
    let first = store
        .last_reserved(idx)
        .and_then(|ip| set.offset_of(ip))
        .map_or(0, |off| (off + 1) % total);
    for k in 0..total {
        let offset = (first + k % total) % total;
        let Some((range, ip)) = set.at(offset) else {
            break;
        };
        if !range.usable(ip) || taken.contains_key(&ip) {
            continue;
        }
        if store.reserve(ip, container_id, ifname)? {
            return Ok(ip);
        }
    }
    Err(Error::RangeExhausted(set.to_string()))
}

/// Releases every address `(container_id, ifname)` holds in the network. Idempotent:
/// nothing held (or no directory at all) is success. Returns how many were released.
pub fn release(conf: &Config, container_id: &str, ifname: &str) -> Result<usize> {
    let Some(store) = Store::open(&conf.dir())? else {
        return Ok(0);
    };
    let mut released = 0;
    for a in store.allocations()? {
        // Files of plugin versions before ifnames were recorded hold only the id.
        if a.container_id == container_id && (a.ifname == ifname || a.ifname.is_empty()) {
            store.release(a.ip)?;
            released += 1;
        }
    }
    Ok(released)
}

/// Releases every allocation whose `(container id, ifname)` is not in `valid`. Keeps
/// going past a failed removal and reports the first error after trying all.
pub fn gc(conf: &Config, valid: &[(String, String)]) -> Result<usize> {
    let Some(store) = Store::open(&conf.dir())? else {
        return Ok(0);
    };
    let mut released = 0;
    let mut first_err = None;
    for a in store.allocations()? {
        let keep = valid
            .iter()
            .any(|(id, ifn)| *id == a.container_id && (*ifn == a.ifname || a.ifname.is_empty()));
        if keep {
            continue;
        }
        match store.release(a.ip) {
            Ok(()) => released += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(released), Err)
}

/// Verifies that `(container_id, ifname)` holds an address in the network, and that every
/// address of `prev` inside this network's ranges is held by it.
pub fn check(
    conf: &Config,
    container_id: &str,
    ifname: &str,
    prev: Option<&CNIResult>,
) -> Result<()> {
    let Some(store) = Store::open(&conf.dir())? else {
        return Err(Error::Check(format!(
            "no allocations for network {}",
            conf.network
        )));
    };
    let mine: Vec<IpAddr> = store
        .allocations()?
        .into_iter()
        .filter(|a| a.container_id == container_id && a.ifname == ifname)
        .map(|a| a.ip)
        .collect();
    if mine.is_empty() {
        return Err(Error::Check(format!(
            "container {container_id} ({ifname}) holds no address in network {}",
            conf.network
        )));
    }
    for ip in prev.into_iter().flat_map(|r| &r.ips) {
        let addr: IpNet = ip
            .address
            .parse()
            .map_err(|e| Error::InvalidConfig(format!("prevResult: {e}")))?;
        let ours = conf
            .range_sets
            .iter()
            .any(|s| s.range_for(addr.addr).is_some());
        if ours && !mine.contains(&addr.addr) {
            return Err(Error::Check(format!(
                "{} is not allocated to container {container_id} ({ifname})",
                addr.addr
            )));
        }
    }
    Ok(())
}

/// The CNI result for `assigned` and the configured routes.
pub fn result(conf: &Config, assigned: &[Assigned]) -> CNIResult {
    CNIResult {
        ips: assigned
            .iter()
            .map(|a| IpConfig {
                interface: None,
                address: a.address.to_string(),
                gateway: a.gateway.map(|g| g.to_string()),
            })
            .collect(),
        routes: conf
            .routes
            .iter()
            .map(|r| Route {
                dst: r.dst.to_string(),
                gw: r.gw.map(|g| g.to_string()),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            })
            .collect(),
        ..CNIResult::default()
    }
}

/// The `berth-host-local` plugin.
#[derive(Debug, Default)]
pub struct HostLocal;

/// The container id, ifname and resolved configuration of an ADD/DEL/CHECK call.
fn attachment(args: &Args) -> Result<(Config, String, String)> {
    let conf = args
        .config()
        .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
    let config = Config::from_netconf(conf, args.args())?;
    let id = args
        .container_id()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::InvalidEnv("CNI_CONTAINERID is empty".into()))?;
    let ifname = args
        .ifname()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::InvalidEnv("CNI_IFNAME is empty".into()))?;
    Ok((config, id.to_string(), ifname.to_string()))
}

impl Cni for HostLocal {
    fn add(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (conf, id, ifname) = attachment(&args)?;
        let assigned = allocate(&conf, &id, &ifname)?;
        Ok(result(&conf, &assigned))
    }

    fn del(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (conf, id, ifname) = attachment(&args)?;
        release(&conf, &id, &ifname)?;
        Ok(CNIResult::default())
    }

    fn check(&self, args: Args) -> std::result::Result<CNIResult, CniError> {
        let (conf, id, ifname) = attachment(&args)?;
        let prev = args.config().and_then(|c| c.prev_result.as_ref());
        check(&conf, &id, &ifname, prev)?;
        Ok(CNIResult::default())
    }

    fn status(&self, args: Args) -> std::result::Result<(), CniError> {
        let conf = args
            .config()
            .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
        let conf = Config::from_netconf(conf, None)?;
        fs::create_dir_all(&conf.data_dir).map_err(|e| {
            CniError::PluginNotAvailable(format!("create data dir {:?}: {e}", conf.data_dir))
        })?;
        Ok(())
    }

    fn gc(&self, args: Args) -> std::result::Result<(), CniError> {
        let netconf = args
            .config()
            .ok_or_else(|| Error::InvalidConfig("no network configuration on stdin".into()))?;
        let conf = Config::from_netconf(netconf, None)?;
        let valid = runner::valid_attachments(runner::stdin_data())
            .ok_or_else(|| Error::InvalidConfig("GC without cni.dev/valid-attachments".into()))?;
        gc(&conf, &valid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: serde_json::Value) -> Config {
        let netconf: NetConf = serde_json::from_value(json).expect("netconf");
        Config::from_netconf(&netconf, None).expect("config")
    }

    #[test]
    fn defaults_skip_network_gateway_and_broadcast() {
        let c = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "ipam": {"type": "berth-host-local", "subnet": "10.9.0.0/29"}
        }));
        let r = &c.range_sets[0].0[0];
        assert_eq!(r.start.to_string(), "10.9.0.1");
        assert_eq!(r.end.to_string(), "10.9.0.6");
        assert_eq!(
            r.gateway.map(|g| g.to_string()).as_deref(),
            Some("10.9.0.1")
        );
        assert!(!r.usable("10.9.0.1".parse().expect("ip")));
    }

    #[test]
    fn runtime_ranges_come_first_and_overlaps_are_refused() {
        let c = conf(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "runtimeConfig": {"ipRanges": [[{"subnet": "10.8.0.0/24"}]]},
            "ipam": {"type": "t", "ranges": [[{"subnet": "fd00::/64"}]]}
        }));
        assert_eq!(c.range_sets.len(), 2);
        assert_eq!(c.range_sets[0].0[0].subnet.to_string(), "10.8.0.0/24");
        let netconf: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "ipam": {"type": "t", "ranges": [[{"subnet": "10.8.0.0/24"}], [{"subnet": "10.8.0.128/25"}]]}
        }))
        .expect("netconf");
        assert!(Config::from_netconf(&netconf, None).is_err());
    }

    #[test]
    fn requested_ips_from_cni_args() {
        let netconf: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "ipam": {"type": "t", "subnet": "10.8.0.0/24"}
        }))
        .expect("netconf");
        let c =
            Config::from_netconf(&netconf, Some("IgnoreUnknown=1;IP=10.8.0.77")).expect("config");
        assert_eq!(
            c.requested,
            vec!["10.8.0.77".parse::<IpAddr>().expect("ip")]
        );
    }
}
