//! Volumes and image operations (tag, history, save/load, import) through the stock docker
//! client against berthd's Docker API.

use crictl_tests::docker::DockerEnv;

/// One request straight at the socket; the whole answer (status line, headers, body).
async fn raw_request(env: &DockerEnv, method: &str, path: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&env.d.docker_socket)
        .await
        .expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

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
    let raw = raw_request(&env, "DELETE", "/v1.44/volumes/beta", b"").await;
    assert!(
        raw.starts_with("HTTP/1.1 409") && raw.contains("volume is in use"),
        "{raw}"
    );
    let raw = raw_request(&env, "GET", "/v1.44/volumes/nosuch", b"").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
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

#[tokio::test(flavor = "multi_thread")]
async fn tag_history_save_load_round_trip() {
    let env = DockerEnv::start("").await;
    env.ok(&["pull", "busybox"]).await;
    env.ok(&["tag", "busybox", "mine/box:1"]).await;
    let images = env
        .ok(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"])
        .await;
    let ids: Vec<&str> = images
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, id)| id))
        .collect();
    assert_eq!(
        lines(
            &images
                .lines()
                .map(|l| l.split(' ').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        vec!["busybox:latest".to_owned(), "mine/box:1".to_owned()],
        "{images}"
    );
    assert_eq!(ids[0], ids[1], "one image, two names");
    let missing = env.docker(&["tag", "nosuch", "x:1"]).await;
    assert!(!missing.status.success());

    let history = env
        .ok(&[
            "history",
            "--no-trunc",
            "--format",
            "{{.ID}}|{{.CreatedBy}}",
            "busybox",
        ])
        .await;
    let first = history.lines().next().unwrap_or_default();
    assert!(first.starts_with("sha256:"), "{history}");
    assert!(first.ends_with("berth-test layer 0"), "{history}");

    let dir = tempfile::tempdir().expect("dir");
    let archive = dir.path().join("box.tar");
    let archive_s = archive.to_str().expect("utf-8 path");
    env.ok(&["save", "-o", archive_s, "busybox", "mine/box:1"])
        .await;
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&archive).expect("open"))
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    for want in ["manifest.json", "index.json", "oci-layout", "repositories"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    // The stdout form streams the same archive.
    let out = env.docker(&["save", "busybox"]).await;
    assert!(out.status.success() && out.stdout.len() > 1024, "{out:?}");

    // By id, an image of two repositories goes only when forced, as docker's does.
    let id = env
        .ok(&["image", "inspect", "-f", "{{.Id}}", "busybox"])
        .await;
    let refused = env.docker(&["rmi", &id.trim()[7..19]]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("image is referenced in multiple repositories"),
        "{refused:?}"
    );
    env.ok(&["rmi", "busybox", "mine/box:1"]).await;
    assert_eq!(env.ok(&["images", "-q"]).await, "");
    let loaded = env.ok(&["load", "-i", archive_s]).await;
    assert!(loaded.contains("Loaded image: busybox:latest"), "{loaded}");
    assert!(loaded.contains("Loaded image: mine/box:1"), "{loaded}");
    assert_eq!(
        env.ok(&["run", "--rm", "mine/box:1", "echo", "loaded"])
            .await,
        "loaded\n"
    );
    // Loading again is harmless; from stdin, gzip-compressed (as `docker save | gzip`), too.
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&std::fs::read(&archive).expect("read"))
            .expect("gzip");
        e.finish().expect("gzip")
    };
    let again = env.docker_with_input(&["load"], Some(&gz)).await;
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("Loaded image: busybox:latest"),
        "{again:?}"
    );
    env.ok(&["rmi", "busybox", "mine/box:1"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn import_of_a_rootfs_tar_runs() {
    use crictl_tests::image::{Compression, busybox_base_layer};
    let env = DockerEnv::start("").await;
    let layer = busybox_base_layer()
        .build(Compression::Gzip)
        .expect("layer");
    let dir = tempfile::tempdir().expect("dir");
    let tar = dir.path().join("rootfs.tar.gz");
    std::fs::write(&tar, &layer.blob).expect("write");
    let id = env
        .ok(&[
            "import",
            "--change",
            r#"CMD ["echo", "imported"]"#,
            "--change",
            "ENV PATH=/bin",
            tar.to_str().expect("utf-8"),
            "rootfs:1",
        ])
        .await;
    assert!(id.trim().starts_with("sha256:"), "{id}");
    assert_eq!(env.ok(&["run", "--rm", "rootfs:1"]).await, "imported\n");
    let diff = env
        .ok(&["inspect", "-f", "{{index .RootFS.Layers 0}}", "rootfs:1"])
        .await;
    assert_eq!(diff.trim(), layer.diff_id);
    // From stdin, plain tar, no name.
    let plain = busybox_base_layer().tar().expect("tar");
    let out = env.docker_with_input(&["import", "-"], Some(&plain)).await;
    assert!(out.status.success(), "{out:?}");
    let dangling = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    env.ok(&["rmi", "rootfs:1"]).await;
    env.ok(&["rmi", &dangling]).await;
    assert_eq!(env.ok(&["images", "-q"]).await, "");
}

/// A tar with raw names (`..` included), for hostile archives.
fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_archives_are_refused_and_leave_nothing() {
    let env = DockerEnv::start("").await;
    let traversal = raw_tar(&[("../../etc/evil", b"x"), ("manifest.json", b"[]")]);
    let out = env.docker_with_input(&["load"], Some(&traversal)).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("path traversal"),
        "{out:?}"
    );

    let raw = raw_request(&env, "POST", "/v1.44/images/load?quiet=1", &traversal).await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    // A GNU long name far past the record limit is refused from its header, not read.
    let mut b = tar::Builder::new(Vec::new());
    let long = vec![b'n'; 64 << 20];
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(long.len() as u64);
    h.set_cksum();
    b.append(&h, long.as_slice()).expect("append");
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "manifest.json", &b"[]"[..])
        .expect("append");
    let long_name = b.into_inner().expect("tar");
    let raw = raw_request(&env, "POST", "/v1.44/images/load?quiet=1", &long_name).await;
    assert!(
        raw.starts_with("HTTP/1.1 400"),
        "{}",
        &raw[..raw.len().min(500)]
    );
    assert!(
        raw.contains("gnu long name"),
        "{}",
        &raw[..raw.len().min(500)]
    );

    let layer = crictl_tests::image::busybox_base_layer()
        .build(crictl_tests::image::Compression::Gzip)
        .expect("layer");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id, layer.diff_id]},
    })
    .to_string();
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["half:1"],
        "Layers": ["a/layer.tar", "b/layer.tar"],
    }])
    .to_string();
    let missing_blob = raw_tar(&[
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
        ("a/layer.tar", &layer.blob),
    ]);
    let out = env.docker_with_input(&["load"], Some(&missing_blob)).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("b/layer.tar is missing"),
        "{out:?}"
    );

    // A layer that is not what the config says fails after unpacking: still nothing left.
    let lying = raw_tar(&[
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
        ("a/layer.tar", &layer.blob),
        ("b/layer.tar", b"not a tar at all, not at all"),
    ]);
    let out = env.docker_with_input(&["load"], Some(&lying)).await;
    assert!(!out.status.success(), "{out:?}");

    let bad_json = raw_tar(&[("manifest.json", b"{nope")]);
    let out = env.docker_with_input(&["load"], Some(&bad_json)).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("manifest.json"),
        "{out:?}"
    );
    assert_eq!(env.ok(&["images", "-q", "-a"]).await, "");
    // What the failed loads wrote (blobs, the first layer's snapshot) is collected.
    let blobs = env.d.root().join("content/sha256");
    let mut left = usize::MAX;
    for _ in 0..50 {
        // The dir must be there: a missing or moved content dir is no proof of collection.
        left = std::fs::read_dir(&blobs)
            .unwrap_or_else(|e| panic!("read content dir {}: {e}", blobs.display()))
            .count();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "blobs left in {}", blobs.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_prune_never_takes_the_volume_of_a_racing_create() {
    let env = DockerEnv::start("").await;
    for i in 0..8 {
        let vol = format!("race{i}");
        env.ok(&["volume", "create", &vol]).await;
        let bind = format!("{vol}:/x");
        let create_args = ["create", "-v", bind.as_str(), "busybox"];
        let prune_args = ["volume", "prune", "-a", "-f"];
        let (created, pruned) = tokio::join!(env.docker(&create_args), env.docker(&prune_args));
        assert!(created.status.success(), "{created:?}");
        assert!(pruned.status.success(), "{pruned:?}");
        // Prune first (the create makes it again) or create first (prune keeps it): either
        // way the container's volume is there.
        let inspect = env.docker(&["volume", "inspect", &vol]).await;
        assert!(inspect.status.success(), "round {i}: {inspect:?}");
        let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
        env.ok(&["rm", &id]).await;
        env.ok(&["volume", "rm", &vol]).await;
    }
}
