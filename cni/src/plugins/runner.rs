//! The CNI protocol around `rscni-plugin`: what a plugin binary's `main` calls.
//!
//! `rscni-plugin` dispatches CNI_COMMAND to a [`Cni`] implementation. Three gaps in it are
//! closed here so that our plugins behave like the reference ones under any runtime:
//! - it writes the ADD result without `cniVersion` (and without the `version` of each IP
//!   that results before 1.0.0 carry); runtimes other than libcni reject such results;
//! - it treats `CNI_NETNS`, `CNI_ARGS` and `CNI_PATH` as required for every command, but
//!   the spec makes `CNI_NETNS` optional on DEL and `CNI_ARGS` optional everywhere;
//! - it returns errors instead of printing the CNI error JSON and exiting non-zero;
//! - its GC attachment type wants `container_id` where the spec (and libcni) send
//!   `containerID`, so it fails to parse every real GC request (see [`valid_attachments`]);
//! - its `runtimeConfig.portMappings` type has no `hostIP` and no `sctp`, so a request with
//!   an SCTP mapping fails to parse before the plugin sees it. The library gets a copy
//!   without `portMappings`; `berth-portmap` reads them from [`stdin_data`].
//!
//! So [`run`] fills the optional variables with empty values, keeps a copy of stdin (a
//! delegating plugin passes it on unchanged, see [`stdin_data`]), captures what the library
//! prints, and writes the spec-conformant output itself.

use std::env;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::OnceLock;

use rscni_plugin::cni::{Cni, Plugin};
use rscni_plugin::error::Error as CniError;
use serde_json::{Value, json};

/// The CNI spec version our plugins report as their own.
pub const CNI_VERSION: &str = "1.1.0";

/// Every CNI spec version our plugins accept in a network configuration.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

static STDIN: OnceLock<Vec<u8>> = OnceLock::new();

/// The network configuration bytes the plugin got on stdin, unchanged (empty for VERSION).
pub fn stdin_data() -> &'static [u8] {
    STDIN.get().map(Vec::as_slice).unwrap_or_default()
}

/// Runs `plugin` for the CNI command in the environment and writes the CNI output.
///
/// Call once, from `main`, before any other thread exists (it sets environment variables).
pub fn run<T: Cni>(about: &str, plugin: &T) -> ExitCode {
    let command = env::var("CNI_COMMAND").unwrap_or_default();
    for var in ["CNI_COMMAND", "CNI_NETNS", "CNI_ARGS", "CNI_PATH"] {
        if env::var_os(var).is_none() {
            // SAFETY: called from `main` before any other thread is started (documented
            // precondition), so nothing reads the environment concurrently.
            unsafe { env::set_var(var, "") };
        }
    }

    let mut conf_version = CNI_VERSION.to_string();
    if !command.is_empty() && command != "VERSION" {
        let mut data = Vec::new();
        if let Err(err) = io::stdin().lock().read_to_end(&mut data) {
            return fail(
                &conf_version,
                CniError::IOFailure(format!("read stdin: {err}")),
            );
        }
        if let Some(v) = serde_json::from_slice::<Value>(&data)
            .ok()
            .and_then(|conf| conf.get("cniVersion")?.as_str().map(str::to_string))
        {
            conf_version = v;
        }
        // The library reads stdin itself: hand it the same bytes again.
        let replay = if command == "GC" {
            gc_compatible(&data)
        } else {
            without_port_mappings(&data)
        };
        if let Err(err) = replace_fd_with(0, &replay) {
            return fail(
                &conf_version,
                CniError::IOFailure(format!("replay stdin: {err}")),
            );
        }
        let _ = STDIN.set(data);
    }

    let versions = SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect();
    let lib = Plugin::new(CNI_VERSION, versions).msg(about);
    let captured = match capture_stdout(|| lib.run(plugin)) {
        Ok((Ok(()), out)) => out,
        Ok((Err(err), _)) => return fail(&conf_version, err),
        Err(err) => return fail(&conf_version, CniError::IOFailure(format!("stdout: {err}"))),
    };

    let output = match command.as_str() {
        "ADD" => match versioned_result(&captured, &conf_version) {
            Ok(out) => out,
            Err(err) => return fail(&conf_version, err),
        },
        // VERSION and the about text for a human are printed as the library made them;
        // DEL, CHECK, STATUS and GC print nothing on success.
        "VERSION" | "" => captured,
        _ => String::new(),
    };
    let mut stdout = io::stdout().lock();
    if stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The `(containerID, ifname)` pairs of a GC request's `cni.dev/valid-attachments` (or of
/// `cni.dev/attachments`, the key of an earlier draft that libcni also sets); `None` if
/// the request has neither.
pub fn valid_attachments(stdin: &[u8]) -> Option<Vec<(String, String)>> {
    let conf: Value = serde_json::from_slice(stdin).ok()?;
    let list = conf
        .get("cni.dev/valid-attachments")
        .or_else(|| conf.get("cni.dev/attachments"))?
        .as_array()?;
    let field = |a: &Value, keys: &[&str]| {
        keys.iter()
            .find_map(|k| a.get(*k)?.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Some(
        list.iter()
            .map(|a| {
                (
                    field(a, &["containerID", "container_id"]),
                    field(a, &["ifname"]),
                )
            })
            .collect(),
    )
}

/// The GC request with a `container_id` copy of each attachment's `containerID`, the key
/// rscni's `GcAttachment` requires.
fn gc_compatible(data: &[u8]) -> Vec<u8> {
    let Ok(mut conf) = serde_json::from_slice::<Value>(data) else {
        return data.to_vec();
    };
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        for a in conf
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(obj) = a.as_object_mut()
                && !obj.contains_key("container_id")
                && let Some(id) = obj.get("containerID").cloned()
            {
                obj.insert("container_id".into(), id);
            }
        }
    }
    serde_json::to_vec(&conf).unwrap_or_else(|_| data.to_vec())
}

/// The request without `runtimeConfig.portMappings` (unchanged if it has none), which
/// rscni-plugin's `NetConf` cannot always parse (see the module doc).
fn without_port_mappings(data: &[u8]) -> Vec<u8> {
    let Ok(mut conf) = serde_json::from_slice::<Value>(data) else {
        return data.to_vec();
    };
    let removed = conf
        .get_mut("runtimeConfig")
        .and_then(Value::as_object_mut)
        .and_then(|rc| rc.remove("portMappings"))
        .is_some();
    if !removed {
        return data.to_vec();
    }
    serde_json::to_vec(&conf).unwrap_or_else(|_| data.to_vec())
}

/// Adds `cniVersion` to the ADD result, and for results before 1.0.0 the IP `version`.
fn versioned_result(captured: &str, conf_version: &str) -> Result<String, CniError> {
    let mut result: Value = serde_json::from_str(captured)
        .map_err(|e| CniError::FailedToDecode(format!("plugin result: {e}")))?;
    let Some(obj) = result.as_object_mut() else {
        return Err(CniError::FailedToDecode(
            "plugin result is not an object".into(),
        ));
    };
    obj.insert("cniVersion".into(), json!(conf_version));
    if conf_version.starts_with("0.")
        && let Some(ips) = obj.get_mut("ips").and_then(Value::as_array_mut)
    {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            let v6 = ip
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            ip.insert("version".into(), json!(if v6 { "6" } else { "4" }));
        }
    }
    serde_json::to_string(&result).map_err(|e| CniError::FailedToDecode(e.to_string()))
}

/// Prints the CNI error JSON for `err` on stdout and returns the failure exit code.
fn fail(conf_version: &str, err: CniError) -> ExitCode {
    let code = u32::from(&err);
    let msg = match &err {
        CniError::Custom(_, msg, _) => msg.clone(),
        other if other.details().is_empty() => other.to_string(),
        other => other.details(),
    };
    let out = json!({
        "cniVersion": conf_version,
        "code": code,
        "msg": msg,
        "details": err.details(),
    });
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{out}");
    let _ = stdout.flush();
    ExitCode::FAILURE
}

/// Makes `target_fd` read `data` from its start (a memfd holding a copy).
fn replace_fd_with(target_fd: RawFd, data: &[u8]) -> io::Result<()> {
    let mut file = memfd()?;
    file.write_all(data)?;
    file.seek(SeekFrom::Start(0))?;
    dup2(file.as_raw_fd(), target_fd)
}

/// Runs `f` with fd 1 pointed at a memfd and returns what was written there.
fn capture_stdout<R>(f: impl FnOnce() -> R) -> io::Result<(R, String)> {
    let mut file = memfd()?;
    // SAFETY: dup of fd 1 has no memory-safety preconditions; the result is checked.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `saved` is a fresh descriptor owned by nobody else.
    let saved = unsafe { OwnedFd::from_raw_fd(saved) };
    dup2(file.as_raw_fd(), 1)?;
    let ret = f();
    let flushed = io::stdout().flush();
    dup2(saved.as_raw_fd(), 1)?;
    flushed?;
    let mut out = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut out)?;
    Ok((ret, out))
}

fn memfd() -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"cni-io".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: both are open descriptors; dup2 atomically replaces `to`.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_get_the_conf_version_and_old_ones_the_ip_version() {
        let out = versioned_result(
            r#"{"ips":[{"address":"10.0.0.2/24"},{"address":"fd00::2/64"}]}"#,
            "0.4.0",
        )
        .expect("versioned");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        let out =
            versioned_result(r#"{"ips":[{"address":"10.0.0.2/24"}]}"#, "1.1.0").expect("versioned");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn port_mappings_the_library_cannot_parse_are_kept_from_it() {
        let req = br#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{
            "portMappings":[{"hostPort":1,"containerPort":2,"protocol":"sctp","hostIP":"::1"}],
            "ips":["10.0.0.2"]}}"#;
        assert!(serde_json::from_slice::<rscni_plugin::types::NetConf>(req).is_err());
        let fixed = without_port_mappings(req);
        let conf: rscni_plugin::types::NetConf =
            serde_json::from_slice(&fixed).expect("rscni parses the rewritten request");
        let rc = conf.runtime_config.expect("runtimeConfig kept");
        assert!(rc.port_mappings.is_empty());
        assert!(rc.custom.contains_key("ips"), "other capabilities stay");
        let plain = br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#;
        assert_eq!(without_port_mappings(plain), plain.to_vec());
    }

    #[test]
    fn gc_attachments_in_the_spec_form_parse_both_ways() {
        let req = br#"{"cniVersion":"1.1.0","name":"n","type":"t",
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#;
        assert_eq!(
            valid_attachments(req),
            Some(vec![("c1".to_string(), "eth0".to_string())])
        );
        // What rscni-plugin's NetConf accepts after the rewrite.
        let fixed = gc_compatible(req);
        let conf: rscni_plugin::types::NetConf =
            serde_json::from_slice(&fixed).expect("rscni parses the rewritten request");
        assert_eq!(conf.valid_attachments.map(|v| v.len()), Some(1));
        assert_eq!(valid_attachments(br#"{"name":"n"}"#), None);
    }
}
