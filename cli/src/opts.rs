//! Parsing docker's flag values: `-p`, `--env-file`, `--memory`, `--cpus`, `--mount`,
//! `--restart`, `-l`, `-e`.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use bollard::models::{Mount, MountType, PortBinding, RestartPolicy, RestartPolicyNameEnum};

/// One `-p` value: `[ip:][hostPort:]containerPort[/proto]`, ranges allowed
/// (`8000-8001:80-81`). Returns `("80/tcp", binding)` pairs.
pub fn parse_publish(spec: &str) -> Result<Vec<(String, PortBinding)>> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => (b, p.to_ascii_lowercase()),
        None => (spec, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        bail!("invalid proto: {proto}");
    }
    // An IPv6 host IP comes in brackets: `[::1]:8080:80`.
    let (ip, rest) = if let Some(r) = body.strip_prefix('[') {
        let (ip, r) = r
            .split_once("]:")
            .with_context(|| format!("invalid IP address in {spec:?}"))?;
        (ip.to_owned(), r.to_owned())
    } else {
        let parts: Vec<&str> = body.split(':').collect();
        match parts.as_slice() {
            [_] | [_, _] => (String::new(), body.to_owned()),
            [ip, h, c] => (ip.to_string(), format!("{h}:{c}")),
            _ => bail!("invalid port format: {spec:?}"),
        }
    };
    let (host, ctr) = match rest.split_once(':') {
        Some((h, c)) => (h, c),
        None => ("", rest.as_str()),
    };
    if ctr.is_empty() {
        bail!("no port specified: {spec}<empty>");
    }
    if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
        bail!("invalid IP address: {ip}");
    }
    let (c0, c1) = port_range(ctr, "containerPort")?;
    let host_range = if host.is_empty() {
        None
    } else {
        Some(port_range(host, "hostPort")?)
    };
    let n = c1 - c0 + 1;
    if let Some((h0, h1)) = host_range
        && h1 - h0 + 1 != n
        && h0 != h1
    {
        bail!("invalid ranges specified for container and host Ports: {ctr} and {host}");
    }
    let mut out = Vec::new();
    for i in 0..n {
        let host_port = match host_range {
            None => String::new(),
            // A single host port with a container range: docker lets the daemon pick in it.
            Some((h0, h1)) if h0 == h1 => h0.to_string(),
            Some((h0, _)) => (h0 + i).to_string(),
        };
        out.push((
            format!("{}/{proto}", c0 + i),
            PortBinding {
                host_ip: Some(ip.clone()),
                host_port: Some(host_port),
            },
        ));
    }
    Ok(out)
}

fn port_range(s: &str, what: &str) -> Result<(u32, u32)> {
    let one = |p: &str| -> Result<u32> {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            Ok(0) if s == "0" => Ok(0),
            _ => bail!("invalid {what}: {s}"),
        }
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if b < a {
                bail!("invalid range specified for port: {s}");
            }
            Ok((a, b))
        }
        None => {
            let p = one(s)?;
            Ok((p, p))
        }
    }
}

/// The lines of an `--env-file`: `KEY=value` as written, `KEY` alone takes the value from our
/// own environment (and is dropped when unset), `#` comments and blank lines are skipped.
pub fn parse_env_file(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (line.trim_end(), None),
        };
        if key.is_empty() {
            bail!("invalid environment variable at line {}: {line:?}", n + 1);
        }
        if key.contains(char::is_whitespace) {
            bail!("variable '{key}' contains whitespaces");
        }
        match value {
            Some(v) => out.push(format!("{key}={v}")),
            None => {
                if let Some(v) = lookup(key) {
                    out.push(format!("{key}={v}"));
                }
            }
        }
    }
    Ok(out)
}

/// One `-e`: `K=v` as is; a bare `K` takes our environment's value (or is left out).
pub fn env_arg(e: &str, lookup: impl Fn(&str) -> Option<String>) -> Option<String> {
    if e.contains('=') {
        Some(e.to_owned())
    } else {
        lookup(e).map(|v| format!("{e}={v}"))
    }
}

/// `512m`, `1g`, `1024` (bytes), `1.5g`: as docker's RAMInBytes reads them.
pub fn parse_bytes(s: &str) -> Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult): (&str, f64) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024.0),
        Some('m') => (&t[..t.len() - 1], 1024.0 * 1024.0),
        Some('g') => (&t[..t.len() - 1], 1024.0 * 1024.0 * 1024.0),
        Some('t') => (&t[..t.len() - 1], 1024f64.powi(4)),
        _ => (t, 1.0),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| *n >= 0.0)
        .with_context(|| format!("invalid size: '{s}'"))?;
    Ok((n * mult) as i64)
}

/// `--cpus 1.5` → NanoCPUs.
pub fn parse_cpus(s: &str) -> Result<i64> {
    let n: f64 = s
        .parse()
        .ok()
        .filter(|n: &f64| *n >= 0.0)
        .with_context(|| format!("failed to parse {s} as a rational number"))?;
    Ok((n * 1e9) as i64)
}

/// `--restart no|always|unless-stopped|on-failure[:N]`.
pub fn parse_restart(s: &str) -> Result<RestartPolicy> {
    let (name, count) = match s.split_once(':') {
        Some((n, c)) => (n, Some(c)),
        None => (s, None),
    };
    let name = match name {
        "" | "no" => RestartPolicyNameEnum::NO,
        "always" => RestartPolicyNameEnum::ALWAYS,
        "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
        "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
        other => bail!(
            "invalid restart policy: unknown policy '{other}'; use one of 'no', 'always', 'on-failure', or 'unless-stopped'"
        ),
    };
    let maximum_retry_count = match count {
        None => None,
        Some(_) if name != RestartPolicyNameEnum::ON_FAILURE => {
            bail!("invalid restart policy: maximum retry count can only be used with 'on-failure'")
        }
        Some(c) => Some(
            c.parse::<i64>()
                .with_context(|| format!("invalid restart policy: invalid count {c:?}"))?,
        ),
    };
    Ok(RestartPolicy {
        name: Some(name),
        maximum_retry_count,
    })
}

/// `-l k=v` (or a bare `k`, an empty value) into a map.
pub fn parse_labels(labels: &[String]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

/// `--mount type=bind,source=/a,target=/b,readonly`.
pub fn parse_mount(spec: &str) -> Result<Mount> {
    let mut m = Mount {
        typ: Some(MountType::VOLUME),
        ..Default::default()
    };
    for field in spec.split(',') {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim())),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        let truthy = |v: Option<&str>| -> Result<bool> {
            match v {
                None | Some("1" | "true") => Ok(true),
                Some("0" | "false") => Ok(false),
                Some(o) => bail!("invalid value for {k}: {o}"),
            }
        };
        match k.as_str() {
            "type" => {
                m.typ = Some(match v.unwrap_or("") {
                    "bind" => MountType::BIND,
                    "volume" => MountType::VOLUME,
                    "tmpfs" => MountType::TMPFS,
                    other => bail!("invalid mount type: {other:?}"),
                })
            }
            "source" | "src" => m.source = v.map(str::to_owned),
            "target" | "destination" | "dst" => m.target = v.map(str::to_owned),
            "readonly" | "ro" => m.read_only = Some(truthy(v)?),
            "" => {}
            other => bail!("unexpected key '{other}' in '{field}'"),
        }
    }
    if m.target.as_deref().unwrap_or("").is_empty() {
        bail!("target is required");
    }
    Ok(m)
}

/// A `KEY=value` or bare `KEY` list from `-e`/`--env-file` in docker's order: files first.
pub fn collect_env(env: &[String], env_files: &[String]) -> Result<Vec<String>> {
    let lookup = |k: &str| std::env::var(k).ok();
    let mut out = Vec::new();
    for f in env_files {
        let text = std::fs::read_to_string(f).with_context(|| format!("open {f}"))?;
        out.extend(parse_env_file(&text, lookup)?);
    }
    out.extend(env.iter().filter_map(|e| env_arg(e, lookup)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(ip: &str, port: &str) -> PortBinding {
        PortBinding {
            host_ip: Some(ip.into()),
            host_port: Some(port.into()),
        }
    }

    #[test]
    fn publish_specs() {
        assert_eq!(
            parse_publish("8080:80").expect("p"),
            vec![("80/tcp".into(), b("", "8080"))]
        );
        assert_eq!(
            parse_publish("127.0.0.1:8080:80/udp").expect("p"),
            vec![("80/udp".into(), b("127.0.0.1", "8080"))]
        );
        assert_eq!(
            parse_publish("80").expect("p"),
            vec![("80/tcp".into(), b("", ""))]
        );
        assert_eq!(
            parse_publish("127.0.0.1::80").expect("p"),
            vec![("80/tcp".into(), b("127.0.0.1", ""))]
        );
        assert_eq!(
            parse_publish("[::1]:53:53/udp").expect("p"),
            vec![("53/udp".into(), b("::1", "53"))]
        );
        assert_eq!(
            parse_publish("8000-8001:80-81").expect("p"),
            vec![
                ("80/tcp".into(), b("", "8000")),
                ("81/tcp".into(), b("", "8001"))
            ]
        );
        assert!(parse_publish("8080:").is_err());
        assert!(parse_publish("x:80").is_err());
        assert!(parse_publish("80/icmp").is_err());
        assert!(parse_publish("999999").is_err());
        assert!(parse_publish("nonsense:1:2").is_err());
        assert!(parse_publish("8000-8002:80-81").is_err());
    }

    #[test]
    fn env_files() {
        let text = "# comment\n\nA=1\nB= spaced value \nFROM_ENV\nUNSET\nC=\n";
        let env =
            parse_env_file(text, |k| (k == "FROM_ENV").then(|| "host".to_owned())).expect("parse");
        assert_eq!(env, ["A=1", "B= spaced value ", "FROM_ENV=host", "C="]);
        assert!(parse_env_file("=x\n", |_| None).is_err());
        assert!(parse_env_file("BAD KEY=x\n", |_| None).is_err());
        assert_eq!(env_arg("K=v", |_| None).as_deref(), Some("K=v"));
        assert_eq!(env_arg("K", |_| Some("x".into())).as_deref(), Some("K=x"));
        assert_eq!(env_arg("K", |_| None), None);
    }

    #[test]
    fn sizes_cpus_restart_labels_mounts() {
        assert_eq!(parse_bytes("512m").expect("m"), 512 << 20);
        assert_eq!(parse_bytes("1g").expect("g"), 1 << 30);
        assert_eq!(parse_bytes("1GB").expect("gb"), 1 << 30);
        assert_eq!(parse_bytes("100").expect("n"), 100);
        assert_eq!(parse_bytes("1.5k").expect("k"), 1536);
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_cpus("1.5").expect("cpus"), 1_500_000_000);
        assert!(parse_cpus("x").is_err());
        let r = parse_restart("on-failure:3").expect("restart");
        assert_eq!(r.name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(r.maximum_retry_count, Some(3));
        assert!(parse_restart("always:3").is_err());
        assert!(parse_restart("sometimes").is_err());
        let l = parse_labels(&["a=1".into(), "b".into(), "c=x=y".into()]);
        assert_eq!(l["a"], "1");
        assert_eq!(l["b"], "");
        assert_eq!(l["c"], "x=y");
        let m = parse_mount("type=bind,source=/a,target=/b,readonly").expect("mount");
        assert_eq!(m.typ, Some(MountType::BIND));
        assert_eq!(m.source.as_deref(), Some("/a"));
        assert_eq!(m.target.as_deref(), Some("/b"));
        assert_eq!(m.read_only, Some(true));
        assert!(parse_mount("type=bind,source=/a").is_err());
        assert!(parse_mount("type=weird,target=/b").is_err());
    }
}
