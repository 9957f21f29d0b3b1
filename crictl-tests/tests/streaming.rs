//! The streaming server: URLs from Exec, Attach and PortForward, single-use tokens, and the
//! sessions behind them over WebSocket (and SPDY), with clients of our own.

use std::time::Duration;

use api::cri;
use bytes::Bytes;
use crictl_tests::pods::{
    Env, assert_clean, create, ctr_config, env, remove_pod, run_pod, sh_config, start, warnings,
};
use crictl_tests::streams::{open_spdy, open_ws, plain_request, spdy_session, ws_session};
use streaming::spdy::Headers;
use streaming::ws::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A pod serving `hello-<name>` with busybox httpd on port 8080 of its loopback.
async fn web_pod(env: &Env, name: &str) -> (String, String) {
    let pod = run_pod(env, name).await;
    let script = format!(
        "mkdir -p /tmp/www && echo hello-{name} > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"
    );
    let ctr = create(env, &pod, sh_config(env, name, &script))
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", warnings(env)));
    start(env, &ctr).await;
    (pod.0, ctr)
}

async fn port_forward_url(env: &Env, pod: &str, ports: &[i32]) -> Result<String, tonic::Status> {
    let mut rt = env.d.runtime().await.expect("client");
    rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    })
    .await
    .map(|r| r.into_inner().url)
}

/// Sends an HTTP GET through a WebSocket port-forward on data channel 0 and returns what came
/// back once `want` shows up; an error with what the error channel said, or how it ended.
async fn get_over_ws(env: &Env, url: &str, want: &str) -> Result<String, String> {
    let (mut ws, proto) = open_ws(&env.d, url, "?port=8080", &["v4.channel.k8s.io"])
        .await
        .expect("websocket");
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    // The server's first message on each channel is the port, little-endian.
    for ch in [0u8, 1] {
        match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
            Ok(Ok(Some(Message::Binary(b)))) => assert_eq!(&b[..], &[ch, 0x90, 0x1f]),
            other => panic!("port message on channel {ch}: {other:?}"),
        }
    }
    let mut req = vec![0u8];
    req.extend_from_slice(b"GET /index.html HTTP/1.0\r\n\r\n");
    ws.send(Message::Binary(Bytes::from(req)))
        .await
        .expect("send");
    let mut got = String::new();
    while !got.contains(want) {
        match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
            Ok(Ok(Some(Message::Binary(b)))) if b.first() == Some(&0) => {
                got.push_str(&String::from_utf8_lossy(&b[1..]));
            }
            Ok(Ok(Some(Message::Binary(b)))) => {
                return Err(format!(
                    "error channel: {}",
                    String::from_utf8_lossy(&b[1..])
                ));
            }
            Ok(Ok(Some(_))) => {}
            other => return Err(format!("ended early ({other:?}) with {got:?}")),
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_over_websocket_reaches_a_server_in_the_pod() {
    let env = env().await;
    let (pod, _ctr) = web_pod(&env, "pfweb").await;
    // busybox httpd takes a moment to listen; retry the first request a few times.
    let mut body = Err(String::new());
    for _ in 0..50 {
        let url = port_forward_url(&env, &pod, &[8080]).await.expect("url");
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        body = get_over_ws(&env, &url, "hello-pfweb").await;
        if body.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = body.expect("port-forward to httpd");
    assert!(
        body.contains("200 OK") && body.contains("hello-pfweb"),
        "{body:?}"
    );

    // Several sessions at once.
    let mut handles = Vec::new();
    for _ in 0..5 {
        let url = port_forward_url(&env, &pod, &[8080]).await.expect("url");
        let env = &env;
        handles.push(async move { get_over_ws(env, &url, "hello-pfweb").await });
    }
    for body in futures::future::join_all(handles).await {
        let body = body.expect("parallel port-forward");
        assert!(body.contains("hello-pfweb"), "{body:?}");
    }

    // Nothing listening: the error channel says so.
    let url = port_forward_url(&env, &pod, &[8081]).await.expect("url");
    let (mut ws, _) = open_ws(&env.d, &url, "?port=8081", &["v4.channel.k8s.io"])
        .await
        .expect("websocket");
    let mut error = String::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
        if let Message::Binary(b) = msg
            && b.len() > 3
            && b[0] == 1
        {
            error = String::from_utf8_lossy(&b[1..]).into_owned();
            break;
        }
    }
    assert!(error.contains("8081"), "{error:?}");
    drop(ws);
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

/// One forwarded connection over a SPDY port-forward session: sends an HTTP GET on a data
/// stream and returns the answer, or what the error stream said.
async fn get_over_spdy(
    session: &streaming::spdy::Session,
    port: u16,
    request_id: u32,
) -> Result<String, String> {
    let headers = |kind: &str| {
        Headers::new()
            .with("streamtype", kind)
            .with("port", port.to_string())
            .with("requestid", request_id.to_string())
    };
    let mut error = session
        .open(headers("error"))
        .await
        .map_err(|e| e.to_string())?;
    let mut data = session
        .open(headers("data"))
        .await
        .map_err(|e| e.to_string())?;
    data.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), data.read_to_string(&mut answer));
    let _ = read.await;
    if answer.is_empty() {
        let mut msg = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), error.read_to_string(&mut msg)).await;
        return Err(msg);
    }
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_over_spdy_carries_parallel_connections_on_one_session() {
    let env = env().await;
    let (pod, _ctr) = web_pod(&env, "spdyweb").await;
    let url = port_forward_url(&env, &pod, &[8080]).await.expect("url");
    let (session, proto) = open_spdy(&env.d, &url, &["portforward.k8s.io"])
        .await
        .expect("spdy upgrade");
    assert_eq!(proto.as_deref(), Some("portforward.k8s.io"));
    let mut first = Err(String::new());
    for id in 0..50 {
        first = get_over_spdy(&session, 8080, id).await;
        if first.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("port-forward to httpd");
    assert!(first.contains("hello-spdyweb"), "{first}");

    // Ten connections at once over the same session.
    let gets = (100..110).map(|id| get_over_spdy(&session, 8080, id));
    for answer in futures::future::join_all(gets).await {
        let answer = answer.expect("parallel connection");
        assert!(
            answer.contains("200 OK") && answer.contains("hello-spdyweb"),
            "{answer}"
        );
    }
    // Nothing listening: the error stream says so, and the session lives on.
    let refused = get_over_spdy(&session, 8081, 200)
        .await
        .expect_err("refused");
    assert!(refused.contains("8081"), "{refused}");
    assert!(get_over_spdy(&session, 8080, 201).await.is_ok());

    // A protocol the server does not speak: 403 with what it accepts.
    let url = port_forward_url(&env, &pod, &[8080]).await.expect("url");
    let refused = open_spdy(&env.d, &url, &["v9.portforward.example"])
        .await
        .expect_err("unknown protocol");
    assert!(
        refused.starts_with("HTTP/1.1 403") && refused.contains("portforward.k8s.io"),
        "{refused}"
    );
    drop(session);
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_single_use_and_bad_requests_are_refused() {
    let env = env().await;
    let pod = run_pod(&env, "tokens").await;
    let ctr = create(&env, &pod, ctr_config(&env, "tokens", &["sleep", "3600"]))
        .await
        .expect("create");
    start(&env, &ctr).await;
    let mut rt = env.d.runtime().await.expect("client");

    // Checked before a URL is handed out.
    for (req, code) in [
        (
            cri::ExecRequest {
                container_id: ctr.clone(),
                cmd: vec![],
                stdout: true,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            cri::ExecRequest {
                container_id: ctr.clone(),
                cmd: vec!["true".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            cri::ExecRequest {
                container_id: ctr.clone(),
                cmd: vec!["true".into()],
                tty: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            cri::ExecRequest {
                container_id: "nosuchcontainer".into(),
                cmd: vec!["true".into()],
                stdout: true,
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        let err = rt.exec(req).await.expect_err("refused");
        assert_eq!(err.code(), code, "{err:?}");
    }
    let err = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "nosuchpod".into(),
            port: vec![80],
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let url = port_forward_url(&env, &pod.0, &[8080]).await.expect("url");
    // Not an upgrade: 400, and the token stays good.
    let answer = plain_request(&env.d, &url, "h2c").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (ws, _) = open_ws(&env.d, &url, "?port=8080", &["v4.channel.k8s.io"])
        .await
        .expect("first use");
    drop(ws);
    // Used once: gone.
    let answer = plain_request(&env.d, &url, "websocket").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "reused token: {answer}");
    let (base, _) = url.rsplit_once('/').expect("token");
    let answer = plain_request(&env.d, &format!("{base}/0123456789abcdef"), "websocket").await;
    assert!(
        answer.starts_with("HTTP/1.1 404"),
        "unknown token: {answer}"
    );
    let exec_url = rt
        .exec(cri::ExecRequest {
            container_id: ctr.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("exec url")
        .into_inner()
        .url;
    assert!(exec_url.contains("/exec/"), "{exec_url}");
    // A token presented on another kind of URL is refused (and spent).
    let wrong = exec_url.replace("/exec/", "/attach/");
    let answer = plain_request(&env.d, &wrong, "websocket").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}

#[allow(clippy::too_many_arguments)]
async fn exec_url(
    env: &Env,
    ctr: &str,
    cmd: &[&str],
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
) -> String {
    let mut rt = env.d.runtime().await.expect("client");
    rt.exec(cri::ExecRequest {
        container_id: ctr.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout,
        stderr,
    })
    .await
    .expect("exec url")
    .into_inner()
    .url
}

async fn sleeper(env: &Env, name: &str) -> (String, String) {
    let pod = run_pod(env, name).await;
    let ctr = create(env, &pod, ctr_config(env, name, &["sleep", "3600"]))
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}\n{}", warnings(env)));
    start(env, &ctr).await;
    (pod.0, ctr)
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_over_websocket_and_spdy_with_and_without_a_terminal() {
    let env = env().await;
    let (pod, ctr) = sleeper(&env, "execs").await;
    let script = ["sh", "-c", "echo out; echo err >&2; exit 3"];

    // WebSocket v5: both outputs and the exit code in the status.
    let url = exec_url(&env, &ctr, &script, false, true, true, false).await;
    let (ws, proto) = open_ws(
        &env.d,
        &url,
        "",
        &["v5.channel.k8s.io", "v4.channel.k8s.io"],
    )
    .await
    .expect("websocket");
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
    let got = ws_session(ws, None, None).await;
    assert_eq!(got.stdout, b"out\n", "{got:?}");
    assert_eq!(got.stderr, b"err\n", "{got:?}");
    assert_eq!(got.exit_code(), Some(3), "{got:?}");

    // WebSocket v5 stdin through cat, ended by the close signal.
    let url = exec_url(&env, &ctr, &["cat"], true, true, false, false).await;
    let (ws, _) = open_ws(&env.d, &url, "", &["v5.channel.k8s.io"])
        .await
        .expect("ws");
    let got = ws_session(ws, Some(b"through cat\n"), None).await;
    assert_eq!(got.stdout, b"through cat\n", "{got:?}");
    assert_eq!(got.exit_code(), Some(0), "{got:?}");

    // SPDY v4, the same two.
    let url = exec_url(&env, &ctr, &script, false, true, true, false).await;
    let (session, proto) = open_spdy(&env.d, &url, &["v4.channel.k8s.io", "v3.channel.k8s.io"])
        .await
        .expect("spdy");
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let got = spdy_session(&session, &["stdout", "stderr"], None, None).await;
    assert_eq!(
        (&got.stdout[..], &got.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(got.exit_code(), Some(3), "{got:?}");
    let url = exec_url(&env, &ctr, &["cat"], true, true, false, false).await;
    let (session, _) = open_spdy(&env.d, &url, &["v4.channel.k8s.io"])
        .await
        .expect("spdy");
    let got = spdy_session(&session, &["stdin", "stdout"], Some(b"spdy cat\n"), None).await;
    assert_eq!(got.stdout, b"spdy cat\n", "{got:?}");
    assert_eq!(got.exit_code(), Some(0), "{got:?}");

    // v2 has no status object: a failure's message only.
    let url = exec_url(&env, &ctr, &["false"], false, true, false, false).await;
    let (session, _) = open_spdy(&env.d, &url, &["v2.channel.k8s.io"])
        .await
        .expect("spdy");
    let got = spdy_session(&session, &["stdout"], None, None).await;
    let text = String::from_utf8_lossy(&got.status);
    assert!(text.contains("non-zero exit code"), "{text}");

    // A terminal, sized by the resize channel, over both.
    let tty_cmd = ["sh", "-c", "sleep 0.5; stty size; tty"];
    let url = exec_url(&env, &ctr, &tty_cmd, false, true, false, true).await;
    let (ws, _) = open_ws(&env.d, &url, "", &["v5.channel.k8s.io"])
        .await
        .expect("ws");
    let got = ws_session(ws, None, Some((100, 40))).await;
    let out = String::from_utf8_lossy(&got.stdout);
    assert!(
        out.contains("40 100") && out.contains("/dev/pts/"),
        "{out:?}"
    );
    let url = exec_url(&env, &ctr, &tty_cmd, false, true, false, true).await;
    let (session, _) = open_spdy(&env.d, &url, &["v4.channel.k8s.io"])
        .await
        .expect("spdy");
    let got = spdy_session(&session, &["stdout", "resize"], None, Some((120, 33))).await;
    let out = String::from_utf8_lossy(&got.stdout);
    assert!(out.contains("33 120"), "{out:?}");
    assert_eq!(got.exit_code(), Some(0), "{got:?}");

    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

async fn sleepers_in(env: &Env, ctr: &str) -> usize {
    let r = crictl_tests::pods::exec_sync(
        env,
        ctr,
        &["sh", "-c", "ps -o args | grep -c '^sleep 1000' || true"],
        10,
    )
    .await
    .expect("exec_sync");
    String::from_utf8_lossy(&r.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_takes_its_exec_with_it() {
    let env = env().await;
    let (pod, ctr) = sleeper(&env, "gone").await;
    for spdy in [false, true] {
        let url = exec_url(&env, &ctr, &["sleep", "1000"], false, true, false, false).await;
        let keep: Box<dyn std::any::Any + Send> = if spdy {
            let (session, _) = open_spdy(&env.d, &url, &["v4.channel.k8s.io"])
                .await
                .expect("spdy");
            let streams = (
                session
                    .open(Headers::new().with("streamtype", "error"))
                    .await
                    .expect("error"),
                session
                    .open(Headers::new().with("streamtype", "stdout"))
                    .await
                    .expect("stdout"),
            );
            Box::new((session, streams))
        } else {
            Box::new(
                open_ws(&env.d, &url, "", &["v5.channel.k8s.io"])
                    .await
                    .expect("ws"),
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sleepers_in(&env, &ctr).await == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the exec never started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(keep);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sleepers_in(&env, &ctr).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the exec outlived its client (spdy: {spdy})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_megabytes_to_a_slow_reader_keep_memory_flat() {
    let env = env().await;
    let (pod, ctr) = sleeper(&env, "bulk").await;
    let pid = env.d.pid().expect("berthd pid");
    let before = rss_kb(pid);
    let url = exec_url(
        &env,
        &ctr,
        &["head", "-c", "100000000", "/dev/zero"],
        false,
        true,
        false,
        false,
    )
    .await;
    let (session, _) = open_spdy(&env.d, &url, &["v4.channel.k8s.io"])
        .await
        .expect("spdy");
    let mut error = session
        .open(Headers::new().with("streamtype", "error"))
        .await
        .expect("error");
    let mut stdout = session
        .open(Headers::new().with("streamtype", "stdout"))
        .await
        .expect("stdout");
    let (mut total, mut peak, mut next_pause) = (0usize, 0u64, 0usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
            .await
            .expect("output stalled")
            .expect("read");
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == 0));
        total += n;
        if total >= next_pause {
            // A slow reader: pauses every 2 MB, while berthd's memory is sampled.
            next_pause += 2 << 20;
            peak = peak.max(rss_kb(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut status = Vec::new();
    error.read_to_end(&mut status).await.expect("status");
    assert_eq!(total, 100_000_000);
    assert!(
        String::from_utf8_lossy(&status).contains("Success"),
        "{status:?}"
    );
    assert!(
        peak < before + 32 * 1024,
        "berthd grew from {before} kB to {peak} kB while streaming"
    );
    eprintln!("berthd RSS {before} kB before, {peak} kB peak while streaming 100 MB");
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_to_a_container_started_with_stdin() {
    let env = env().await;
    let pod = run_pod(&env, "attach").await;
    let cfg = cri::ContainerConfig {
        stdin: true,
        ..ctr_config(&env, "attach", &["cat"])
    };
    let ctr = create(&env, &pod, cfg).await.expect("create");
    start(&env, &ctr).await;
    let mut rt = env.d.runtime().await.expect("client");
    let attach = |tty: bool| cri::AttachRequest {
        container_id: ctr.clone(),
        stdin: true,
        tty,
        stdout: true,
        stderr: false,
    };
    let url = rt
        .attach(attach(false))
        .await
        .expect("url")
        .into_inner()
        .url;
    let (mut ws, _) = open_ws(&env.d, &url, "", &["v5.channel.k8s.io"])
        .await
        .expect("ws");
    ws.send(Message::Binary(Bytes::from_static(b"\0ping\n")))
        .await
        .expect("stdin");
    let mut out = Vec::new();
    while !out.ends_with(b"ping\n") {
        match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
            Ok(Ok(Some(Message::Binary(b)))) if b.first() == Some(&1) => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("attach ended early: {other:?} {out:?}"),
        }
    }
    drop(ws);
    // The container runs on after the client left, and keeps what went through the log.
    let log = env.logs.path().join("attach.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !crictl_tests::pods::read_cri_log(&log).0.contains("ping") {
        assert!(std::time::Instant::now() < deadline, "ping not in the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A terminal the container does not have is refused before a URL is handed out.
    let err = rt.attach(attach(true)).await.expect_err("tty mismatch");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("tty"), "{err:?}");
    remove_pod(&env, &pod.0).await;
    assert_clean(&env);
}
