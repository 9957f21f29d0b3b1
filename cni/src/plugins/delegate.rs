//! Running a delegated plugin as CNI plugins do (the IPAM plugin named in `ipam.type`, or
//! `berth-bridge` under `berth-vxlan`): found in `CNI_PATH`, run with our environment and
//! the given stdin.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use rscni_plugin::types::CNIResult;
use serde_json::Value;

use super::{Error, Result};

/// Runs plugin `plugin_type` for `command` with `stdin`, searching `cni_path`.
/// Returns the parsed result for ADD, `None` for other commands.
pub fn exec(
    plugin_type: &str,
    command: &str,
    cni_path: &[PathBuf],
    stdin: &[u8],
) -> Result<Option<CNIResult>> {
    if plugin_type.is_empty() || plugin_type.contains('/') {
        return Err(Error::InvalidConfig(format!(
            "bad delegated plugin type {plugin_type:?}"
        )));
    }
    let binary = cni_path
        .iter()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(plugin_type))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "plugin {plugin_type:?} not found in CNI_PATH {cni_path:?}"
            ))
        })?;
    let io_err = |op: &'static str, e| Error::io(op, &binary, e);
    let mut child = Command::new(&binary)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io_err("run delegated plugin", e))?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin)
            .map_err(|e| io_err("write delegated plugin stdin", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| io_err("wait for delegated plugin", e))?;
    if !out.status.success() {
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let text = |k: &str| reply[k].as_str().unwrap_or_default().to_string();
        let msg = match text("msg") {
            m if m.is_empty() => format!(
                "{command} failed ({}) with output {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ),
            m => m,
        };
        return Err(Error::Delegate {
            plugin: plugin_type.to_string(),
            code: reply["code"]
                .as_u64()
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(999),
            msg,
            details: text("details"),
        });
    }
    if command != "ADD" {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Delegate {
            plugin: plugin_type.to_string(),
            code: 6,
            msg: format!("cannot decode its result: {e}"),
            details: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
}
