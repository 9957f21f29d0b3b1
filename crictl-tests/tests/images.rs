//! ImageService end to end: a real registry, a real berthd, driven through the CRI socket.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use api::cri;
use crictl_tests::daemon::{Daemon, require_root};
use crictl_tests::image::{
    self, Compression, Image, ImageBuilder, LayerBuilder, ManifestFormat, RawEntry, busybox_image,
};
use crictl_tests::registry::{Registry, unused_addr};
use tonic::Code;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

async fn pull(d: &Daemon, image: &str) -> Result<String, tonic::Status> {
    d.pull_image(image, None).await
}

async fn pull_auth(
    d: &Daemon,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    d.pull_image(image, auth).await
}

async fn status(d: &Daemon, image: &str, verbose: bool) -> cri::ImageStatusResponse {
    let mut c = d.images().await.expect("client");
    c.image_status(cri::ImageStatusRequest {
        image: spec(image),
        verbose,
    })
    .await
    .expect("image status")
    .into_inner()
}

async fn list(d: &Daemon) -> Vec<cri::Image> {
    let mut c = d.images().await.expect("client");
    c.list_images(cri::ListImagesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .images
}

async fn remove(d: &Daemon, image: &str) {
    d.remove_image(image).await.expect("remove image");
}

/// Snapshot `fs` dirs on disk.
fn snapshot_dirs(d: &Daemon) -> Vec<PathBuf> {
    let dir = d.root().join("snapshots");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("fs"))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn blobs(d: &Daemon) -> BTreeSet<String> {
    std::fs::read_dir(d.root().join("content/sha256"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

fn dir_entries(p: &Path) -> usize {
    std::fs::read_dir(p).map(|rd| rd.count()).unwrap_or(0)
}

/// The snapshot dir that holds `rel`, if any.
fn find_in_snapshots(d: &Daemon, rel: &str) -> Option<PathBuf> {
    snapshot_dirs(d)
        .into_iter()
        .map(|s| s.join(rel))
        .find(|p| p.symlink_metadata().is_ok())
}

/// Nothing half-done left by a failed or interrupted pull.
fn assert_no_leftovers(d: &Daemon) {
    assert_eq!(
        dir_entries(&d.root().join("content/ingest")),
        0,
        "ingest files left"
    );
    assert!(
        snapshot_dirs(d).is_empty(),
        "snapshots left: {:?}",
        snapshot_dirs(d)
    );
    assert!(blobs(d).is_empty(), "blobs left: {:?}", blobs(d));
}

fn assert_no_panic(d: &Daemon) {
    let log = d.log();
    assert!(!log.contains("panicked"), "berthd panicked:\n{log}");
}

async fn registry_with(repo: &str, tag: &str, img: &Image) -> Registry {
    let reg = Registry::start().await.expect("registry");
    image::push_image(&reg.addr(), repo, tag, img)
        .await
        .expect("push");
    reg
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_by_tag_then_list_status_remove() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("busybox", "1", &img).await;
    let d = Daemon::start().await.expect("daemon");
    let name = format!("{}/busybox:1", reg.addr());
    let id = pull(&d, &name).await.expect("pull");
    assert_eq!(id, img.config_digest, "image_ref is the config digest");

    let images = list(&d).await;
    assert_eq!(images.len(), 1);
    let i = &images[0];
    assert_eq!(i.id, img.config_digest);
    assert_eq!(i.repo_tags, vec![name.clone()]);
    assert_eq!(
        i.repo_digests,
        vec![format!("{}/busybox@{}", reg.addr(), img.manifest_digest)]
    );
    assert_eq!(i.username, "app");
    assert!(i.uid.is_none());
    assert!(i.size as usize >= img.layers_size());

    // Status by name, id, short id-less hex and digest reference all find it.
    for by in [
        name.clone(),
        img.config_digest.clone(),
        img.config_digest.trim_start_matches("sha256:").to_owned(),
        format!("{}/busybox@{}", reg.addr(), img.manifest_digest),
    ] {
        let s = status(&d, &by, false).await;
        assert_eq!(
            s.image.map(|i| i.id),
            Some(img.config_digest.clone()),
            "status by {by}"
        );
        assert!(s.info.is_empty());
    }
    let verbose = status(&d, &name, true).await;
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).expect("info json");
    assert_eq!(info["imageSpec"]["config"]["User"], "app");
    assert_eq!(info["imageSpec"]["config"]["WorkingDir"], "/home/app");
    assert_eq!(info["layers"].as_array().map(Vec::len), Some(3));
    // Unknown image: no error, no image.
    assert!(
        status(&d, "127.0.0.1:1/nope:latest", false)
            .await
            .image
            .is_none()
    );

    // Layers are unpacked in overlay form.
    let busybox = find_in_snapshots(&d, "bin/busybox").expect("busybox unpacked");
    assert_eq!(
        std::fs::read(&busybox).expect("read"),
        std::fs::read("/bin/busybox").expect("host")
    );
    // Layer 1 has the directory, layer 2 its whiteout: a 0/0 character device.
    let whiteout = snapshot_dirs(&d)
        .into_iter()
        .filter_map(|s| s.join("var/lib/gone").symlink_metadata().ok())
        .find(|m| m.file_type().is_char_device());
    assert_eq!(
        whiteout.map(|m| m.rdev()),
        Some(0),
        "whiteout is a 0/0 char device"
    );
    let opq = find_in_snapshots(&d, "opq/new")
        .expect("opaque dir")
        .parent()
        .expect("dir")
        .to_path_buf();
    assert_eq!(
        xattr::get(&opq, "trusted.overlay.opaque").expect("xattr"),
        Some(b"y".to_vec())
    );
    let a = find_in_snapshots(&d, "data/a").expect("a");
    let b = find_in_snapshots(&d, "data/b").expect("b");
    assert_eq!(
        a.metadata().expect("a").ino(),
        b.metadata().expect("b").ino(),
        "hardlink kept"
    );
    let suid = find_in_snapshots(&d, "usr/bin/suid").expect("suid");
    assert_eq!(suid.metadata().expect("suid").mode() & 0o7777, 0o4755);
    let owned = find_in_snapshots(&d, "data/owned")
        .expect("owned")
        .metadata()
        .expect("owned");
    assert_eq!(
        (owned.uid(), owned.gid(), owned.mode() & 0o777),
        (1000, 1000, 0o600)
    );
    let sh = find_in_snapshots(&d, "bin/sh").expect("sh");
    assert_eq!(std::fs::read_link(&sh).expect("link"), Path::new("busybox"));
    assert_eq!(
        xattr::get(
            find_in_snapshots(&d, "data/xattr").expect("x"),
            "user.berth"
        )
        .expect("get"),
        Some(b"test".to_vec())
    );

    // ImageFsInfo counts what is on disk.
    let mut c = d.images().await.expect("client");
    let fs = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("fsinfo")
        .into_inner();
    let u = &fs.image_filesystems[0];
    let busybox_size = std::fs::metadata("/bin/busybox").expect("stat").len();
    assert!(u.used_bytes.as_ref().expect("bytes").value >= busybox_size);
    assert!(u.inodes_used.as_ref().expect("inodes").value >= 20);
    assert!(u.timestamp > 0);
    assert!(
        u.fs_id
            .as_ref()
            .expect("fs id")
            .mountpoint
            .starts_with(d.root().to_str().expect("utf8"))
    );

    remove(&d, &name).await;
    assert!(list(&d).await.is_empty());
    remove(&d, &name).await; // idempotent
    assert_no_leftovers(&d);
    let after = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("fsinfo")
        .into_inner();
    assert!(
        after.image_filesystems[0]
            .used_bytes
            .as_ref()
            .expect("bytes")
            .value
            < busybox_size
    );
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_docker_schema2_by_digest_and_tag_plus_digest() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Docker2)
        .expect("build");
    let reg = registry_with("team/app", "v1", &img).await;
    let d = Daemon::start().await.expect("daemon");
    let by_digest = format!("{}/team/app@{}", reg.addr(), img.manifest_digest);
    assert_eq!(
        pull(&d, &by_digest).await.expect("pull by digest"),
        img.config_digest
    );
    let i = &list(&d).await[0];
    assert!(i.repo_tags.is_empty(), "pulled by digest: no tag");
    assert_eq!(i.repo_digests, vec![by_digest.clone()]);
    // tag+digest: the digest wins, as in containerd.
    let both = format!("{}/team/app:ignored@{}", reg.addr(), img.manifest_digest);
    assert_eq!(
        pull(&d, &both).await.expect("pull tag+digest"),
        img.config_digest
    );
    // Then by tag: same image gains the tag, nothing is fetched twice.
    pull(&d, &format!("{}/team/app:v1", reg.addr()))
        .await
        .expect("pull by tag");
    let images = list(&d).await;
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0].repo_tags,
        vec![format!("{}/team/app:v1", reg.addr())]
    );
    // Three pulls of one image: the config and every layer came from the registry once.
    let log = std::fs::read_to_string(reg.log_path()).expect("registry log");
    for digest in img
        .layers
        .iter()
        .map(|l| l.digest.as_str())
        .chain([img.config_digest.as_str()])
    {
        assert_eq!(
            blob_gets(&log, "team/app", digest),
            1,
            "blob {digest} fetched more than once"
        );
    }
    // A wrong digest is NotFound, not a different image.
    let wrong = format!("{}/team/app@sha256:{}", reg.addr(), "0".repeat(64));
    assert_eq!(
        pull(&d, &wrong).await.expect_err("wrong digest").code(),
        Code::NotFound
    );
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_through_mirror_for_docker_io() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("library/busybox", "latest", &img).await;
    let config = format!(
        "[registry.\"docker.io\"]\nmirrors = [\"http://{}\"]\n",
        reg.addr()
    );
    let d = Daemon::start_with_config(&config).await.expect("daemon");
    assert_eq!(
        pull(&d, "busybox").await.expect("pull via mirror"),
        img.config_digest
    );
    let i = &list(&d).await[0];
    assert_eq!(
        i.repo_tags,
        vec!["docker.io/library/busybox:latest".to_owned()]
    );
    assert_eq!(
        i.repo_digests,
        vec![format!("docker.io/library/busybox@{}", img.manifest_digest)]
    );
    let s = status(&d, "busybox:latest", false).await;
    assert_eq!(s.image.map(|i| i.id), Some(img.config_digest.clone()));
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_layers_survive_removal_of_one_image() {
    require_root();
    let base = image::busybox_base_layer()
        .build(Compression::Gzip)
        .expect("base");
    let one = ImageBuilder::new()
        .layer(base.clone())
        .layer(
            LayerBuilder::new()
                .file("/one", b"1", 0o644)
                .build(Compression::Gzip)
                .expect("l"),
        )
        .build(ManifestFormat::Oci)
        .expect("one");
    let two = ImageBuilder::new()
        .layer(base.clone())
        .layer(
            LayerBuilder::new()
                .file("/two", b"2", 0o644)
                .build(Compression::Zstd)
                .expect("l"),
        )
        .user("1000:1000")
        .build(ManifestFormat::Oci)
        .expect("two");
    let reg = registry_with("one", "latest", &one).await;
    image::push_image(&reg.addr(), "two", "latest", &two)
        .await
        .expect("push two");
    let d = Daemon::start().await.expect("daemon");
    pull(&d, &format!("{}/one", reg.addr()))
        .await
        .expect("pull one");
    pull(&d, &format!("{}/two", reg.addr()))
        .await
        .expect("pull two");
    assert_eq!(snapshot_dirs(&d).len(), 3, "the base layer is stored once");
    let two_status = status(&d, &format!("{}/two", reg.addr()), false)
        .await
        .image
        .expect("two");
    assert_eq!(
        two_status.uid.map(|u| u.value),
        Some(1000),
        "numeric USER gives uid"
    );
    assert!(two_status.username.is_empty());

    remove(&d, &format!("{}/one", reg.addr())).await;
    assert_eq!(snapshot_dirs(&d).len(), 2, "only one's own layer went");
    assert!(blobs(&d).contains(&base.digest), "shared blob kept");
    assert!(!blobs(&d).contains(&one.config_digest));
    assert!(find_in_snapshots(&d, "bin/busybox").is_some());
    assert!(find_in_snapshots(&d, "one").is_none());
    // The survivor still pulls as present and is complete.
    pull(&d, &format!("{}/two", reg.addr()))
        .await
        .expect("re-pull two");
    assert_eq!(snapshot_dirs(&d).len(), 2);

    remove(&d, &two.config_digest).await;
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_fetch_each_layer_once() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("busybox", "latest", &img).await;
    let d = Daemon::start().await.expect("daemon");
    let name = format!("{}/busybox", reg.addr());
    let pulls = (0..4).map(|_| pull(&d, &name));
    for r in futures_join_all(pulls).await {
        assert_eq!(r.expect("pull"), img.config_digest);
    }
    assert_eq!(list(&d).await.len(), 1);
    assert_eq!(snapshot_dirs(&d).len(), 3);
    let log = std::fs::read_to_string(reg.log_path()).expect("registry log");
    for l in &img.layers {
        let gets = blob_gets(&log, "busybox", &l.digest);
        assert_eq!(gets, 1, "layer {} fetched {gets} times", l.digest);
    }
    assert_no_panic(&d);
}

/// How many times the registry served `GET /v2/<repo>/blobs/<digest>`, from its access log.
fn blob_gets(log: &str, repo: &str, digest: &str) -> usize {
    log.lines()
        // Access-log lines only: the registry also logs "response completed" per request.
        .filter(|line| line.contains(&format!("\"GET /v2/{repo}/blobs/{digest}")))
        .count()
}

async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = fs.collect();
    let mut out = Vec::new();
    // Poll all at once: join them pairwise through a JoinSet-free select loop.
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = handles.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    for r in results {
        out.push(r.expect("every future finished"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_platform_index_selects_the_host_and_refuses_foreign_only() {
    require_root();
    let reg = Registry::start().await.expect("registry");
    for format in [ManifestFormat::Oci, ManifestFormat::Docker2] {
        let (index, images) = image::multi_platform_index(format).expect("index");
        let repo = format!("multi-{format:?}").to_lowercase();
        image::push_index(&reg.addr(), &repo, "latest", &index, &images)
            .await
            .expect("push");
        let d = Daemon::start().await.expect("daemon");
        let host = images
            .iter()
            .find(|i| i.platform == image::Platform::host())
            .expect("host image");
        let name = format!("{}/{repo}", reg.addr());
        assert_eq!(
            pull(&d, &name).await.expect("pull index"),
            host.config_digest
        );
        let i = &list(&d).await[0];
        // The repo digest is the index's, as the tag resolved to it.
        assert_eq!(i.repo_digests, vec![format!("{name}@{}", index.digest)]);
        assert!(blobs(&d).contains(&index.digest), "index blob stored");
        let marker = find_in_snapshots(&d, "etc/berth-platform").expect("platform marker");
        assert_eq!(
            std::fs::read_to_string(marker).expect("read").trim(),
            image::Platform::host().to_string()
        );
        assert_no_panic(&d);
    }
    let (index, images) = image::arm64_only_index(ManifestFormat::Oci).expect("index");
    image::push_index(&reg.addr(), "armonly", "latest", &index, &images)
        .await
        .expect("push");
    let d = Daemon::start().await.expect("daemon");
    let err = pull(&d, &format!("{}/armonly", reg.addr()))
        .await
        .expect_err("foreign only");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("linux/amd64") && err.message().contains("arm64"),
        "{}",
        err.message()
    );
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_and_down_registry() {
    require_root();
    let reg = Registry::start().await.expect("registry");
    let d = Daemon::start().await.expect("daemon");
    let err = pull(&d, &format!("{}/nothing:here", reg.addr()))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let down = unused_addr();
    let err = pull(&d, &format!("{down}/busybox"))
        .await
        .expect_err("down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&down),
        "names the registry: {}",
        err.message()
    );
    let err = pull(&d, "Not A Reference").await.expect_err("bad ref");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = pull(&d, "").await.expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = Registry::start_with_basic_auth("berth", "s3cret")
        .await
        .expect("registry");
    reg.client()
        .expect("client")
        .push_image("private", "latest", &img)
        .await
        .expect("push");
    let d = Daemon::start().await.expect("daemon");
    let name = format!("{}/private", reg.addr());
    let err = pull(&d, &name).await.expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let wrong = cri::AuthConfig {
        username: "berth".into(),
        password: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&d, &name, Some(wrong))
            .await
            .expect_err("wrong")
            .code(),
        Code::Unauthenticated
    );
    let good = cri::AuthConfig {
        username: "berth".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&d, &name, Some(good)).await.expect("user/pass"),
        img.config_digest
    );
    remove(&d, &name).await;
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode("berth:s3cret");
    let auth = cri::AuthConfig {
        auth: encoded,
        ..Default::default()
    };
    assert_eq!(
        pull_auth(&d, &name, Some(auth)).await.expect("auth field"),
        img.config_digest
    );
    assert_no_panic(&d);
}

/// Layers that try to write outside their root.
fn hostile_layers(outside: &Path) -> Vec<(&'static str, LayerBuilder)> {
    let out = outside
        .to_str()
        .expect("utf8")
        .trim_start_matches('/')
        .to_owned();
    let dots = format!("../../../../../../../../{out}");
    vec![
        (
            "dotdot",
            LayerBuilder::new()
                .raw_entry(RawEntry::new(format!("{dots}/x"), b'0').data(b"x".to_vec())),
        ),
        (
            "absolute",
            LayerBuilder::new()
                .raw_entry(RawEntry::new(format!("/{out}/x"), b'0').data(b"x".to_vec())),
        ),
        (
            "symlink-parent",
            LayerBuilder::new()
                .raw_entry(RawEntry::new("lnk", b'2').link(format!("/{out}")))
                .raw_entry(RawEntry::new("lnk/x", b'0').data(b"x".to_vec())),
        ),
        (
            "symlink-dotdot",
            LayerBuilder::new()
                .raw_entry(RawEntry::new("up", b'2').link(dots.clone()))
                .raw_entry(RawEntry::new("up/x", b'0').data(b"x".to_vec())),
        ),
        (
            "hardlink-outside",
            LayerBuilder::new().raw_entry(RawEntry::new("h", b'1').link("/etc/passwd")),
        ),
        (
            "hardlink-dotdot",
            LayerBuilder::new().raw_entry(RawEntry::new("h", b'1').link(format!("{dots}/x"))),
        ),
        (
            "giant-gnu-longname",
            LayerBuilder::new()
                .raw_entry(RawEntry::new("././@LongLink", b'L').data(vec![b'a'; 2 << 20]))
                .raw_entry(RawEntry::new("x", b'0').data(b"x".to_vec())),
        ),
        (
            "giant-pax-header",
            LayerBuilder::new()
                .raw_entry(RawEntry::new("pax", b'x').data(vec![b'9'; 3 << 20]))
                .raw_entry(RawEntry::new("x", b'0').data(b"x".to_vec())),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_are_refused_and_leave_nothing() {
    require_root();
    let outside = tempfile::tempdir().expect("outside");
    let victim = outside.path().join("victim");
    std::fs::create_dir(&victim).expect("mkdir");
    let reg = Registry::start().await.expect("registry");
    let d = Daemon::start().await.expect("daemon");
    let good = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    image::push_image(&reg.addr(), "good", "latest", &good)
        .await
        .expect("push");
    pull(&d, &format!("{}/good", reg.addr()))
        .await
        .expect("pull good");
    let before = (snapshot_dirs(&d), blobs(&d));
    for (name, layer) in hostile_layers(&victim) {
        let layer = layer.build(Compression::Gzip).expect("layer");
        let img = ImageBuilder::new()
            .layer(layer)
            .build(ManifestFormat::Oci)
            .expect("image");
        image::push_image(&reg.addr(), name, "latest", &img)
            .await
            .expect("push");
        let err = pull(&d, &format!("{}/{name}", reg.addr()))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::DataLoss, "{name}: {err:?}");
        assert!(
            err.message().contains("refused"),
            "{name}: {}",
            err.message()
        );
        assert_eq!(dir_entries(&victim), 0, "{name} wrote outside the snapshot");
        assert!(
            std::fs::read_to_string("/etc/passwd")
                .expect("passwd")
                .starts_with("root:")
        );
        assert_eq!(list(&d).await.len(), 1, "{name} registered something");
    }
    // Failed pulls clean up in the background; give GC a moment, then nothing new remains.
    wait_until(|| (snapshot_dirs(&d), blobs(&d)) == before).await;
    assert_eq!(dir_entries(&d.root().join("content/ingest")), 0);
    assert_no_panic(&d);
}

async fn wait_until(f: impl FnMut() -> bool) {
    wait_until_every(std::time::Duration::from_millis(25), f).await;
}

/// Polls `f` every `period` for 5 s at most.
async fn wait_until_every(period: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(period).await;
    }
    assert!(f(), "condition not reached within 5 s");
}

/// Path of a blob in the registry's filesystem storage.
fn registry_blob(reg: &Registry, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_blobs_and_wrong_media_types_are_refused() {
    require_root();
    let reg = Registry::start().await.expect("registry");
    let d = Daemon::start().await.expect("daemon");

    // Same length, other bytes: the digest check catches it.
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    image::push_image(&reg.addr(), "flipped", "latest", &img)
        .await
        .expect("push");
    let path = registry_blob(&reg, &img.layers[2].digest);
    let mut bytes = std::fs::read(&path).expect("blob");
    let last = bytes.len() - 600; // inside the tar's data, past the header
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt");
    let err = pull(&d, &format!("{}/flipped", reg.addr()))
        .await
        .expect_err("flipped");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("digest"), "{}", err.message());

    // Truncated gzip stream.
    let img = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("/f", &vec![7u8; 100_000], 0o644)
                .build(Compression::Gzip)
                .expect("l"),
        )
        .build(ManifestFormat::Oci)
        .expect("build");
    image::push_image(&reg.addr(), "truncated", "latest", &img)
        .await
        .expect("push");
    let path = registry_blob(&reg, &img.layers[0].digest);
    let bytes = std::fs::read(&path).expect("blob");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = pull(&d, &format!("{}/truncated", reg.addr()))
        .await
        .expect_err("truncated");
    assert!(
        matches!(err.code(), Code::DataLoss | Code::Unavailable),
        "{err:?}"
    );

    // A manifest whose config is not a container image config (an OCI artifact).
    let layer = LayerBuilder::new()
        .file("/f", b"x", 0o644)
        .build(Compression::Gzip)
        .expect("l");
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": image::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.thing.config.v1+json", "size": 2,
                   "digest": image::sha256_digest(b"{}")},
        "layers": [{"mediaType": image::OCI_LAYER_GZIP, "size": layer.size(), "digest": layer.digest}],
    });
    image::push_blob(&reg.addr(), "artifact", b"{}".to_vec())
        .await
        .expect("blob");
    image::push_blob(&reg.addr(), "artifact", layer.blob.clone())
        .await
        .expect("blob");
    image::push_raw_manifest(
        &reg.addr(),
        "artifact",
        "latest",
        image::OCI_MANIFEST,
        artifact.to_string().as_bytes(),
    )
    .await
    .expect("manifest");
    let err = pull(&d, &format!("{}/artifact", reg.addr()))
        .await
        .expect_err("artifact");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("config media type"),
        "{}",
        err.message()
    );

    // A layer of a media type we cannot unpack.
    let odd = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": image::OCI_MANIFEST,
        "config": {"mediaType": image::OCI_CONFIG, "size": img.config.len(), "digest": img.config_digest},
        "layers": [{"mediaType": "application/vnd.example.blob", "size": layer.size(), "digest": layer.digest}],
    });
    image::push_blob(&reg.addr(), "odd", img.config.clone())
        .await
        .expect("blob");
    image::push_blob(&reg.addr(), "odd", layer.blob.clone())
        .await
        .expect("blob");
    image::push_raw_manifest(
        &reg.addr(),
        "odd",
        "latest",
        image::OCI_MANIFEST,
        odd.to_string().as_bytes(),
    )
    .await
    .expect("manifest");
    let err = pull(&d, &format!("{}/odd", reg.addr()))
        .await
        .expect_err("odd layer");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("media type"), "{}", err.message());

    assert!(list(&d).await.is_empty());
    wait_until(|| snapshot_dirs(&d).is_empty() && blobs(&d).is_empty()).await;
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_pull_then_restart_recovers() {
    require_root();
    let small = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let big = image::big_image(48, 4)
        .expect("big")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("small", "latest", &small).await;
    image::push_image(&reg.addr(), "big", "latest", &big)
        .await
        .expect("push big");
    let mut d = Daemon::start().await.expect("daemon");
    pull(&d, &format!("{}/small", reg.addr()))
        .await
        .expect("pull small");
    let small_snaps = snapshot_dirs(&d);
    let small_blobs = blobs(&d);

    // Kill at several points of a big pull: as soon as data lands, and a little later.
    for delay_ms in [0u64, 150, 400] {
        let name = format!("{}/big", reg.addr());
        let socket = d.socket.clone();
        let pulling = tokio::spawn(async move {
            let ch = crictl_tests::daemon::connect(&socket)
                .await
                .expect("connect");
            let mut c = cri::image_service_client::ImageServiceClient::new(ch);
            c.pull_image(cri::PullImageRequest {
                image: spec(&name),
                ..Default::default()
            })
            .await
        });
        let ingest = d.root().join("content/ingest");
        let snaps = d.root().join("snapshots");
        let started = snapshot_dirs(&d).len();
        // Polled tightly: the first iteration must kill the pull before it can finish.
        wait_until_every(std::time::Duration::from_millis(1), || {
            dir_entries(&ingest) > 0 || snapshot_dirs_in(&snaps) > started
        })
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        d.kill9().await.expect("kill");
        let _ = pulling.await;
        d.restart().await.expect("restart");
        let images = list(&d).await;
        // The small image is intact; the big one is either complete or absent, never half.
        assert!(
            images.iter().any(|i| i.id == small.config_digest),
            "small image lost"
        );
        let big_present = images.iter().any(|i| i.id == big.config_digest);
        if delay_ms == 0 {
            // Killed as the first byte landed: this iteration really interrupts a pull, so
            // the test cannot pass by only ever killing after the pull finished.
            assert!(!big_present, "the big pull finished before the kill");
        }
        if !big_present {
            assert_eq!(
                snapshot_dirs(&d),
                small_snaps,
                "half-pulled layers left after restart"
            );
            assert_eq!(
                blobs(&d),
                small_blobs,
                "half-pulled blobs left after restart"
            );
        }
        assert_eq!(dir_entries(&ingest), 0, "ingest left after restart");
        if big_present {
            remove(&d, &big.config_digest).await;
        }
    }
    // The interrupted pull completes afterwards.
    assert_eq!(
        pull(&d, &format!("{}/big", reg.addr()))
            .await
            .expect("pull big"),
        big.config_digest
    );
    assert_eq!(
        snapshot_dirs(&d).len(),
        small_snaps.len() + big.layers.len() - 1,
        "busybox base shared"
    );
    let small_status = status(&d, &small.config_digest, true).await;
    assert!(small_status.image.is_some());
    assert_no_panic(&d);
}

fn snapshot_dirs_in(dir: &Path) -> usize {
    dir_entries(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn native_snapshotter_applies_layers_with_whiteouts() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("busybox", "latest", &img).await;
    let d = Daemon::start_with_config("snapshotter = \"native\"\n")
        .await
        .expect("daemon");
    let name = format!("{}/busybox", reg.addr());
    assert_eq!(pull(&d, &name).await.expect("pull"), img.config_digest);
    assert_eq!(snapshot_dirs(&d).len(), 3, "one full tree per layer");
    // The top snapshot is the whole image, with whiteouts applied as deletions.
    let top = snapshot_dirs(&d)
        .into_iter()
        .find(|s| s.join("etc/motd").exists())
        .expect("top layer snapshot");
    assert!(top.join("bin/busybox").is_file());
    assert!(top.join("var/lib").is_dir());
    assert!(
        top.join("var/lib/gone").symlink_metadata().is_err(),
        "whiteout deletes"
    );
    let opq: BTreeSet<String> = std::fs::read_dir(top.join("opq"))
        .expect("opq")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        opq,
        BTreeSet::from(["new".to_owned()]),
        "opaque dir hides the lower contents"
    );
    let a = top.join("data/a").metadata().expect("a");
    assert_eq!(a.ino(), top.join("data/b").metadata().expect("b").ino());
    let devices = walk(&top)
        .into_iter()
        .filter(|m| m.file_type().is_char_device())
        .count();
    assert_eq!(devices, 0, "no overlay whiteout devices in a native tree");
    remove(&d, &name).await;
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

fn walk(dir: &Path) -> Vec<std::fs::Metadata> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let e = e.expect("entry");
        let md = e.path().symlink_metadata().expect("stat");
        if md.is_dir() {
            out.extend(walk(&e.path()));
        }
        out.push(md);
    }
    out
}

/// What the fake registry sends for one request.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: Body,
    /// Whether to send Content-Length; without it the body ends when the connection closes.
    content_length: bool,
}

#[derive(Clone)]
enum Body {
    Bytes(Vec<u8>),
    /// That many spaces, written as they go: never held in memory.
    Spaces(usize),
}

impl Answer {
    fn ok(body: &[u8]) -> Answer {
        Answer {
            status: 200,
            body: Body::Bytes(body.to_vec()),
            content_length: true,
        }
    }
}

/// A tiny HTTP/1.1 "registry" on 127.0.0.1: one request per connection, answered by a function
/// of the request path. Counts requests. Stops when dropped.
struct FakeRegistry {
    addr: String,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeRegistry {
    async fn start(answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> FakeRegistry {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let local = listener.local_addr().expect("addr");
        crictl_tests::hostns::expose_everywhere(local);
        let addr = local.to_string();
        let hits = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let _ = serve_one(conn, &*answer).await;
                });
            }
        });
        FakeRegistry { addr, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn serve_one(
    mut conn: tokio::net::TcpStream,
    answer: &(dyn Fn(&str) -> Answer + Send + Sync),
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let a = answer(&path);
    let len = match &a.body {
        Body::Bytes(b) => b.len(),
        Body::Spaces(n) => *n,
    };
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
         Connection: close\r\n",
        a.status
    );
    if a.content_length {
        out.push_str(&format!("Content-Length: {len}\r\n"));
    }
    out.push_str("\r\n");
    conn.write_all(out.as_bytes()).await?;
    match &a.body {
        Body::Bytes(b) => conn.write_all(b).await?,
        Body::Spaces(n) => {
            let chunk = vec![b' '; 64 << 10];
            let mut left = *n;
            while left > 0 {
                let k = left.min(chunk.len());
                conn.write_all(&chunk[..k]).await?;
                left -= k;
            }
        }
    }
    conn.shutdown().await
}

/// berthd's peak resident memory so far (VmHWM), in KiB: what it held at its worst, not what
/// it kept.
fn peak_rss_kib(d: &Daemon) -> u64 {
    let pid = d.pid().expect("berthd runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_manifests_and_error_bodies_are_not_read() {
    require_root();
    const HUGE: usize = 64 << 20;
    let fake = FakeRegistry::start(|path| match path {
        "/v2/" => Answer::ok(b""),
        p if p.starts_with("/v2/sized/manifests/") => Answer {
            status: 200,
            body: Body::Spaces(HUGE),
            content_length: true,
        },
        p if p.starts_with("/v2/unsized/manifests/") => Answer {
            status: 200,
            body: Body::Spaces(HUGE),
            content_length: false,
        },
        _ => Answer {
            status: 404,
            body: Body::Spaces(HUGE),
            content_length: false,
        },
    })
    .await;
    let d = Daemon::start().await.expect("daemon");
    for repo in ["sized", "unsized"] {
        let started = std::time::Instant::now();
        let err = pull(&d, &format!("{}/{repo}:latest", fake.addr))
            .await
            .expect_err(repo);
        assert_eq!(err.code(), Code::DataLoss, "{repo}: {err:?}");
        assert!(err.message().contains("larger than"), "{}", err.message());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{repo}: took {:?}",
            started.elapsed()
        );
    }
    // A 404 with a giant body: the status is the answer, the body is not read.
    let err = pull(&d, &format!("{}/missing:latest", fake.addr))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let rss = peak_rss_kib(&d);
    eprintln!("berthd peak RSS {rss} KiB");
    assert!(
        rss < 64 << 10,
        "berthd VmHWM {rss} KiB after 64 MiB answers"
    );
    assert!(list(&d).await.is_empty());
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_longer_than_their_descriptors_are_refused() {
    require_root();
    let reg = Registry::start().await.expect("registry");
    let d = Daemon::start().await.expect("daemon");
    // Each image has blobs of its own: the registry stores blobs once for all repositories.
    let layer_img = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("/f", &vec![3u8; 50_000], 0o644)
                .build(Compression::Gzip)
                .expect("l"),
        )
        .label("case", "long-layer")
        .build(ManifestFormat::Oci)
        .expect("build");
    let config_img = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("/g", b"g", 0o644)
                .build(Compression::Gzip)
                .expect("l"),
        )
        .label("case", "long-config")
        .build(ManifestFormat::Oci)
        .expect("build");
    for (repo, img, blob) in [
        ("longlayer", &layer_img, &layer_img.layers[0].digest),
        ("longconfig", &config_img, &config_img.config_digest),
    ] {
        image::push_image(&reg.addr(), repo, "latest", img)
            .await
            .expect("push");
        // The registry serves what its storage holds: a blob with bytes past its descriptor.
        let path = registry_blob(&reg, blob);
        let mut bytes = std::fs::read(&path).expect("blob");
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).expect("lengthen");
        let err = pull(&d, &format!("{}/{repo}", reg.addr()))
            .await
            .expect_err(repo);
        assert_eq!(err.code(), Code::DataLoss, "{repo}: {err:?}");
        assert!(
            err.message().contains("longer than"),
            "{repo}: {}",
            err.message()
        );
    }
    assert!(list(&d).await.is_empty());
    wait_until(|| snapshot_dirs(&d).is_empty() && blobs(&d).is_empty()).await;
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusing_mirror_falls_back_to_the_registry() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("busybox", "latest", &img).await;
    let refusals = [
        (
            429,
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
        ),
        (
            403,
            r#"{"errors":[{"code":"DENIED","message":"not for you"}]}"#,
        ),
        (400, "what?"),
    ];
    for (status, body) in refusals {
        let mirror = FakeRegistry::start(move |_| Answer {
            status,
            body: Body::Bytes(body.as_bytes().to_vec()),
            content_length: true,
        })
        .await;
        let config = format!(
            "[registry.\"{}\"]\nmirrors = [\"http://{}\"]\n",
            reg.addr(),
            mirror.addr
        );
        let d = Daemon::start_with_config(&config).await.expect("daemon");
        assert_eq!(
            pull(&d, &format!("{}/busybox", reg.addr()))
                .await
                .unwrap_or_else(|e| panic!("mirror answering {status}: {e:?}")),
            img.config_digest
        );
        assert!(mirror.hits() > 0, "the mirror was not asked first");
        assert_no_panic(&d);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn short_ids_and_unparsable_names() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let reg = registry_with("busybox", "latest", &img).await;
    let d = Daemon::start().await.expect("daemon");
    pull(&d, &format!("{}/busybox", reg.addr()))
        .await
        .expect("pull");
    let hex = img.config_digest.trim_start_matches("sha256:");
    for by in [
        hex[..12].to_owned(),
        hex[..3].to_owned(),
        format!("sha256:{}", &hex[..8]),
    ] {
        let s = status(&d, &by, false).await;
        assert_eq!(
            s.image.map(|i| i.id),
            Some(img.config_digest.clone()),
            "status by {by}"
        );
    }
    assert!(
        status(&d, &hex[..2], false).await.image.is_none(),
        "too short"
    );
    // Unparsable names are absent, not errors, as in containerd.
    assert!(status(&d, "Not A Reference", false).await.image.is_none());
    d.remove_image("Not A Reference")
        .await
        .expect("remove unparsable");
    assert_eq!(list(&d).await.len(), 1);
    // PullImage still refuses them.
    assert_eq!(
        pull(&d, "Not A Reference").await.expect_err("pull").code(),
        Code::InvalidArgument
    );
    d.remove_image(&hex[..5]).await.expect("remove by prefix");
    assert!(list(&d).await.is_empty());
    assert_no_leftovers(&d);
    assert_no_panic(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn index_entries_without_platform_and_foreign_manifests() {
    require_root();
    let reg = Registry::start().await.expect("registry");
    let foreign = image::platform_image(&image::foreign_platform())
        .expect("foreign")
        .build(ManifestFormat::Oci)
        .expect("build");
    let host = image::platform_image(&image::Platform::host())
        .expect("host")
        .build(ManifestFormat::Oci)
        .expect("build");
    let unlabelled = |i: &Image| {
        let mut d = i.descriptor();
        d.as_object_mut().expect("object").remove("platform");
        d
    };
    // No entry says its platform: the configs decide, the foreign one first in the index.
    let index = image::Index::from_descriptors(
        ManifestFormat::Oci,
        vec![unlabelled(&foreign), unlabelled(&host)],
    );
    image::push_index(
        &reg.addr(),
        "noplatform",
        "latest",
        &index,
        &[foreign.clone(), host.clone()],
    )
    .await
    .expect("push");
    let only_foreign =
        image::Index::from_descriptors(ManifestFormat::Oci, vec![unlabelled(&foreign)]);
    image::push_index(
        &reg.addr(),
        "noplatform-foreign",
        "latest",
        &only_foreign,
        std::slice::from_ref(&foreign),
    )
    .await
    .expect("push");
    // A plain manifest for another platform, no index at all.
    image::push_image(&reg.addr(), "foreign", "latest", &foreign)
        .await
        .expect("push");

    let d = Daemon::start().await.expect("daemon");
    assert_eq!(
        pull(&d, &format!("{}/noplatform", reg.addr()))
            .await
            .expect("pull unlabelled index"),
        host.config_digest
    );
    for repo in ["noplatform-foreign", "foreign"] {
        let err = pull(&d, &format!("{}/{repo}", reg.addr()))
            .await
            .expect_err(repo);
        assert_eq!(err.code(), Code::NotFound, "{repo}: {err:?}");
        assert!(
            err.message()
                .contains(&image::foreign_platform().architecture),
            "{repo}: {}",
            err.message()
        );
    }
    assert_eq!(list(&d).await.len(), 1);
    assert_no_panic(&d);
}
