//! The stock docker client against berthd's Docker API.

use crictl_tests::docker::DockerEnv;

#[tokio::test(flavor = "multi_thread")]
async fn docker_run_rm_prints_the_output_and_exits_with_the_containers_code() {
    let env = DockerEnv::start("").await;
    let out = env.ok(&["run", "--rm", "busybox", "echo", "hi"]).await;
    assert_eq!(out, "hi\n");
    let failed = env
        .docker(&[
            "run",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ])
        .await;
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    assert_eq!(String::from_utf8_lossy(&failed.stderr), "oops\n");
    let left = env.ok(&["ps", "-a", "-q"]).await;
    assert_eq!(left, "", "--rm containers are gone");
}
