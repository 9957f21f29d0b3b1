//! RuntimeService basics and the old-client `:authority` fix, end to end.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use api::cri;
use crictl_tests::daemon::{Daemon, require_root};
use crictl_tests::rawh2;
use prost::Message;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn version_status_and_runtime_config() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let md = std::fs::metadata(&d.socket).expect("socket");
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o660, "socket is 0660");

    let mut rt = d.runtime().await.expect("client");
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .expect("version")
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");

    let s = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner();
    let conds = s.status.expect("status").conditions;
    let get = |t: &str| conds.iter().find(|c| c.r#type == t).expect(t).clone();
    assert!(get("RuntimeReady").status);
    // berthd wrote its default network and berth's plugins are installed beside it.
    let net = get("NetworkReady");
    assert!(net.status, "network ready: {net:?}");

    let c = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("config")
        .into_inner();
    assert_eq!(
        c.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    let err = rt
        .exec(cri::ExecRequest::default())
        .await
        .expect_err("no command");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Not built yet: UNIMPLEMENTED, never a fake success.
    let err = rt
        .exec_sync(cri::ExecSyncRequest::default())
        .await
        .expect_err("no container id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = rt
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest::default())
        .await
        .expect_err("unbuilt");
    assert_eq!(err.code(), Code::Unimplemented);
    // Built: a request without an id is the caller's mistake, not a missing feature.
    let err = rt
        .container_stats(cri::ContainerStatsRequest::default())
        .await
        .expect_err("no id");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_path_as_authority_is_accepted() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let body = cri::VersionRequest {
        version: "v1".into(),
    }
    .encode_to_vec();
    let socket_authority = d.socket.to_str().expect("utf8").to_owned();
    for authority in [
        socket_authority.as_str(),
        "localhost",
        "/run/berth/berth.sock",
        "unix:///x",
    ] {
        let r = rawh2::unary_call(
            &d.socket,
            authority,
            "/runtime.v1.RuntimeService/Version",
            &body,
        )
        .await
        .expect("call");
        assert_eq!(r.rst_stream, None, "authority {authority:?} was reset");
        assert_eq!(r.goaway, None, "authority {authority:?} got GOAWAY");
        let v = cri::VersionResponse::decode(r.data.as_slice()).expect("decode VersionResponse");
        assert_eq!(v.runtime_name, "berth", "authority {authority:?}");
        assert!(r.got_trailers);
    }
    // The daemon keeps serving ordinary clients afterwards.
    let mut rt = d.runtime().await.expect("client");
    rt.version(cri::VersionRequest::default())
        .await
        .expect("version");
    assert!(!d.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn second_daemon_on_a_live_socket_refuses() {
    require_root();
    let d = Daemon::start().await.expect("daemon");
    let out = std::process::Command::new(crictl_tests::daemon::bin_dir().join("berthd"))
        .arg("--listen")
        .arg(&d.socket)
        .arg("--root")
        .arg(d.root().with_extension("other"))
        .arg("--state")
        .arg(d.state().with_extension("other"))
        .arg("--config")
        .arg("/nonexistent")
        .output()
        .expect("run berthd");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(d.root().with_extension("other"));
    let _ = std::fs::remove_dir_all(d.state().with_extension("other"));
    // The first daemon is untouched.
    d.runtime()
        .await
        .expect("client")
        .version(cri::VersionRequest::default())
        .await
        .expect("version");
}
