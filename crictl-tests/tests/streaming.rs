//! The streaming server: URLs from Exec, Attach and PortForward, single-use tokens, and the
//! sessions behind them over WebSocket (and SPDY), with clients of our own.

use std::time::Duration;

use api::cri;
use bytes::Bytes;
use crictl_tests::pods::{
    Env, assert_clean, create, ctr_config, env, remove_pod, run_pod, sh_config, start, warnings,
};
use crictl_tests::streams::{open_spdy, open_ws, plain_request};
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
