//! Volumes and image operations (tag, history, save/load, import) through the stock docker
//! client against berthd's Docker API.

use crictl_tests::docker::DockerEnv;

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_objects_with_labels_filters_and_prune() {
    let env = DockerEnv::start("").await;
    assert_eq!(
        env.ok(&["volume", "create", "--label", "team=a", "alpha"])
            .await,
        "alpha\n"
    );
    env.ok(&["volume", "create", "beta"]).await;
    // An existing name gives back the existing volume.
    assert_eq!(env.ok(&["volume", "create", "beta"]).await, "beta\n");
    let generated = env.ok(&["volume", "create"]).await;
    let generated = generated.trim().to_owned();
    assert_eq!(generated.len(), 64, "{generated}");
    assert_eq!(
        lines(&env.ok(&["volume", "ls", "-q"]).await),
        lines(&format!("alpha\nbeta\n{generated}\n"))
    );
    assert_eq!(
        env.ok(&["volume", "ls", "-q", "--filter", "label=team=a"])
            .await,
        "alpha\n"
    );
    assert_eq!(
        env.ok(&["volume", "ls", "-q", "--filter", "name=bet"])
            .await,
        "beta\n"
    );
    let inspect = env
        .ok(&[
            "volume",
            "inspect",
            "-f",
            "{{.Name}} {{.Driver}} {{.Labels.team}} {{.Scope}}",
            "alpha",
        ])
        .await;
    assert_eq!(inspect, "alpha local a local\n");
    let mountpoint = env
        .ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", "alpha"])
        .await;
    assert!(
        mountpoint.trim().ends_with("/volumes/alpha/_data"),
        "{mountpoint}"
    );
    assert!(std::path::Path::new(mountpoint.trim()).is_dir());

    // A container using a volume (not even running) keeps it from rm and prune.
    env.ok(&["create", "--name", "user", "-v", "beta:/b", "busybox"])
        .await;
    assert_eq!(
        env.ok(&["volume", "ls", "-q", "--filter", "dangling=false"])
            .await,
        "beta\n"
    );
    let id = env.ok(&["inspect", "-f", "{{.Id}}", "user"]).await;
    let busy = env.docker(&["volume", "rm", "beta"]).await;
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("volume is in use") && err.contains(id.trim()),
        "{err}"
    );
    let missing = env.docker(&["volume", "rm", "nosuch"]).await;
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no such volume"),
        "{missing:?}"
    );
    let inspect_missing = env.docker(&["volume", "inspect", "nosuch"]).await;
    assert!(!inspect_missing.status.success());

    // Prune: by default only anonymous volumes; --all takes named ones that nothing uses.
    let pruned = env.ok(&["volume", "prune", "-f"]).await;
    assert!(pruned.contains("Total reclaimed space"), "{pruned}");
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await.lines().count(), 3);
    let pruned = env
        .ok(&["volume", "prune", "-f", "--all", "--filter", "label=team=a"])
        .await;
    assert!(pruned.contains("alpha"), "{pruned}");
    let pruned = env.ok(&["volume", "prune", "-f", "--all"]).await;
    assert!(pruned.contains(&generated), "{pruned}");
    assert!(!pruned.contains("beta"), "{pruned}");
    env.ok(&["rm", "user"]).await;
    env.ok(&["volume", "rm", "beta"]).await;
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn named_volume_data_outlives_containers_and_berthd() {
    let mut env = DockerEnv::start("").await;
    env.ok(&[
        "run",
        "--rm",
        "-v",
        "data:/d",
        "busybox",
        "sh",
        "-c",
        "echo x > /d/f",
    ])
    .await;
    // Made on first use, at create.
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "data\n");
    assert_eq!(
        env.ok(&["run", "--rm", "-v", "data:/d", "busybox", "cat", "/d/f"])
            .await,
        "x\n"
    );
    // Read-only volumes and binds refuse writes.
    let ro = env
        .docker(&[
            "run",
            "--rm",
            "-v",
            "data:/d:ro",
            "busybox",
            "sh",
            "-c",
            "echo y > /d/f",
        ])
        .await;
    assert!(!ro.status.success(), "{ro:?}");
    assert!(
        String::from_utf8_lossy(&ro.stderr).contains("Read-only file system"),
        "{ro:?}"
    );
    let host = tempfile::tempdir().expect("host dir");
    let bind = format!("{}:/h:ro", host.path().display());
    let ro = env
        .docker(&["run", "--rm", "-v", &bind, "busybox", "touch", "/h/x"])
        .await;
    assert!(!ro.status.success(), "{ro:?}");
    assert!(!host.path().join("x").exists());
    let rw = format!("{}:/h", host.path().display());
    env.ok(&["run", "--rm", "-v", &rw, "busybox", "touch", "/h/x"])
        .await;
    assert!(host.path().join("x").exists());

    // Inspect shows the volume with its name, source and driver.
    env.ok(&["create", "--name", "keep", "-v", "data:/d", "busybox"])
        .await;
    let mounts = env
        .ok(&[
            "inspect",
            "-f",
            "{{range .Mounts}}{{.Type}} {{.Name}} {{.Driver}} {{.Destination}} {{.Source}}{{end}}",
            "keep",
        ])
        .await;
    assert!(
        mounts.starts_with("volume data local /d /") && mounts.trim().ends_with("/data/_data"),
        "{mounts}"
    );

    // A fresh volume is filled from the image's files at its path, owners kept; a used one
    // is not filled again.
    let first = env
        .ok(&[
            "run",
            "--rm",
            "-v",
            "home:/home",
            "busybox",
            "sh",
            "-c",
            "ls -ln /home | grep -c ' 1000 *1000 .* app$'; rmdir /home/app",
        ])
        .await;
    assert_eq!(first, "1\n");
    assert_eq!(
        env.ok(&["run", "--rm", "-v", "home:/home", "busybox", "ls", "/home"])
            .await,
        ""
    );
    env.ok(&["volume", "rm", "home"]).await;

    env.d.restart().await.expect("restart berthd");
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "data\n");
    assert!(!env.docker(&["volume", "rm", "data"]).await.status.success());
    assert_eq!(
        env.ok(&["start", "-a", "keep"]).await,
        "",
        "busybox sh with no tty exits at once"
    );
    assert_eq!(
        env.ok(&["run", "--rm", "-v", "data:/d", "busybox", "cat", "/d/f"])
            .await,
        "x\n"
    );
    env.ok(&["rm", "keep"]).await;
    env.ok(&["volume", "rm", "data"]).await;
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_volumes_go_with_rm_v_and_run_rm() {
    let env = DockerEnv::start("").await;
    env.ok(&[
        "run",
        "--name",
        "anon",
        "-v",
        "/scratch",
        "busybox",
        "sh",
        "-c",
        "echo z > /scratch/f",
    ])
    .await;
    let name = env
        .ok(&["inspect", "-f", "{{range .Mounts}}{{.Name}}{{end}}", "anon"])
        .await;
    let name = name.trim().to_owned();
    assert_eq!(name.len(), 64, "{name}");
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await.trim(), name);
    let labels = env
        .ok(&["volume", "inspect", "-f", "{{json .Labels}}", &name])
        .await;
    assert!(labels.contains("com.docker.volume.anonymous"), "{labels}");
    // Used by a stopped container: prune keeps it.
    env.ok(&["volume", "prune", "-f"]).await;
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await.trim(), name);
    env.ok(&["rm", "-v", "anon"]).await;
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "");

    // `--rm` takes the anonymous volume, never a named one.
    env.ok(&[
        "run", "--rm", "-v", "/scratch", "-v", "named:/n", "busybox", "true",
    ])
    .await;
    let mut left = String::new();
    for _ in 0..50 {
        left = env.ok(&["volume", "ls", "-q"]).await;
        if left == "named\n" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(left, "named\n");
    // Without -v the anonymous volume stays, dangling, for prune.
    env.ok(&["create", "--name", "keeps", "-v", "/x", "busybox"])
        .await;
    env.ok(&["rm", "keeps"]).await;
    assert_eq!(
        env.ok(&["volume", "ls", "-q", "--filter", "dangling=true"])
            .await
            .lines()
            .count(),
        2
    );
    env.ok(&["volume", "prune", "-f"]).await;
    assert_eq!(env.ok(&["volume", "ls", "-q"]).await, "named\n");
    env.ok(&["volume", "rm", "named"]).await;
}
