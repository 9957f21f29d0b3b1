//! docker-py, the Python client docker-compose v1 and many tools are built on, against
//! berthd's Docker API: the compose-style scenario in `fixtures/compose_scenario.py`.

use crictl_tests::docker::DockerEnv;

/// The venv `scripts/deps` makes with docker-py in it, beside the build's binaries.
fn docker_py_python() -> std::path::PathBuf {
    let python = crictl_tests::daemon::bin_dir()
        .parent()
        .expect("target dir")
        .join("docker-py/bin/python3");
    assert!(
        python.exists(),
        "docker-py is needed at {} for this test: run ./scripts/deps (it makes the venv)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compose_style_project_runs_through_docker_py() {
    let python = docker_py_python();
    let env = DockerEnv::start("").await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/compose_scenario.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new(python)
            .arg(&script)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", env.d.docker_socket.display()),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the scenario did not finish within 180 s")
    .expect("run python");
    assert!(
        out.status.success(),
        "compose scenario failed ({}):\nstdout: {}\nstderr: {}\nberthd log tail:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        crictl_tests::docker::tail(&env.d.log(), 40)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("compose scenario: ok"));
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");
    assert_eq!(
        env.ok(&["network", "ls", "-q", "--filter", "name=demo_default"])
            .await,
        ""
    );
}
