//! Self-tests of the registry and image harness, without berthd. They need no root: a real
//! `docker-registry` per test, images pushed with our client, checked with the registry API and
//! with skopeo as an independent parser.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::PathBuf;

use crictl_tests::image::{
    self, Compression, ImageBuilder, Index, LayerBuilder, ManifestFormat, Platform, RawEntry,
    RegistryClient, TarEntry, busybox_image, list_tar, sha256_digest,
};
use crictl_tests::registry::{self, Registry};
use serde_json::Value;

fn pid_alive(pid: u32) -> bool {
    // A reaped child is gone; kill(pid, 0) then fails with ESRCH.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn skopeo(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("skopeo")
        .args(args)
        .output()
        .await
        .expect("run skopeo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn skopeo_inspect(reference: &str, extra: &[&str]) -> (bool, String, String) {
    let target = format!("docker://{reference}");
    let mut args = vec!["inspect", "--tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&target);
    skopeo(&args).await
}

fn entry<'a>(entries: &'a [TarEntry], path: &str) -> &'a TarEntry {
    entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no entry {path} in {:#?}", entries))
}

/// Pushes `image` and checks that the registry and skopeo serve exactly what we built.
async fn check_pushed_image(
    reg: &Registry,
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    image: &image::Image,
) {
    client.push_image(repo, tag, image).await.expect("push");

    let by_tag = client
        .get_manifest(repo, tag)
        .await
        .unwrap()
        .expect("manifest by tag");
    let by_digest = client
        .get_manifest(repo, &image.manifest_digest)
        .await
        .unwrap()
        .expect("manifest by digest");
    assert_eq!(&by_tag.bytes[..], &image.manifest[..]);
    assert_eq!(&by_digest.bytes[..], &image.manifest[..]);
    assert_eq!(by_tag.content_type, image.manifest_media_type);
    assert_eq!(by_digest.content_type, image.manifest_media_type);
    assert_eq!(
        by_tag.digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );

    let config = client
        .get_blob(repo, &image.config_digest)
        .await
        .unwrap()
        .expect("config");
    assert_eq!(sha256_digest(&config), image.config_digest);
    for layer in &image.layers {
        let blob = client
            .get_blob(repo, &layer.digest)
            .await
            .unwrap()
            .expect("layer");
        assert_eq!(sha256_digest(&blob), layer.digest);
        assert_eq!(blob.len(), layer.size());
    }

    let reference = reg.image_ref(repo, tag);
    let (ok, raw, err) = skopeo_inspect(&reference, &["--raw"]).await;
    assert!(ok, "skopeo inspect --raw failed: {err}");
    assert_eq!(raw.as_bytes(), &image.manifest[..]);

    let (ok, cooked, err) = skopeo_inspect(&reference, &[]).await;
    assert!(ok, "skopeo inspect failed: {err}");
    let cooked: Value = serde_json::from_str(&cooked).unwrap();
    assert_eq!(cooked["Digest"], image.manifest_digest.as_str());
    assert_eq!(cooked["Architecture"], image.platform.architecture.as_str());
    assert_eq!(cooked["Os"], "linux");
    let layers: Vec<&str> = cooked["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let want: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, want);

    let (ok, cfg, err) = skopeo_inspect(&reference, &["--config", "--raw"]).await;
    assert!(ok, "skopeo inspect --config failed: {err}");
    assert_eq!(cfg.as_bytes(), &image.config[..]);
}

#[tokio::test]
async fn registry_starts_answers_and_is_cleaned_up() {
    let reg = Registry::start().await.unwrap();
    let pid = reg.pid();
    let dir: PathBuf = reg.storage_dir();
    assert!(reg.addr().starts_with("127.0.0.1:"));
    assert_eq!(reg.host(), "127.0.0.1");
    assert_eq!(reg.addr(), format!("127.0.0.1:{}", reg.port()));
    let resp = reg
        .client()
        .unwrap()
        .request(reqwest_get(), "/v2/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(reg.log_path().exists());
    assert!(pid_alive(pid));
    drop(reg);
    assert!(!pid_alive(pid), "registry {pid} survived drop");
    assert!(!dir.exists(), "temp dir {dir:?} survived drop");
}

fn reqwest_get() -> reqwest::Method {
    reqwest::Method::GET
}

#[test]
fn registry_is_killed_when_the_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let reg = Registry::start_blocking().unwrap();
        tx.send((reg.pid(), reg.storage_dir())).unwrap();
        panic!("simulated test failure");
    });
    assert!(thread.join().is_err());
    let (pid, dir) = rx.recv().unwrap();
    assert!(!pid_alive(pid), "registry {pid} survived a panicking test");
    assert!(!dir.exists());
}

#[tokio::test]
async fn many_registries_start_in_parallel() {
    let regs = start_registries(8).await;
    let mut addrs: Vec<String> = regs.iter().map(Registry::addr).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 8);
}

async fn start_registries(n: usize) -> Vec<Registry> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(Registry::start())).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}

#[tokio::test]
async fn busybox_oci_and_docker_images_round_trip() {
    let reg = Registry::start().await.unwrap();
    let client = reg.client().unwrap();
    let builder = busybox_image().unwrap();
    let oci = builder.build(ManifestFormat::Oci).unwrap();
    let docker = builder.build(ManifestFormat::Docker2).unwrap();
    assert_ne!(oci.manifest_digest, docker.manifest_digest);
    // Same config bytes in both formats; only the media types differ.
    assert_eq!(oci.config_digest, docker.config_digest);
    check_pushed_image(&reg, &client, "library/busybox", "oci", &oci).await;
    check_pushed_image(&reg, &client, "library/busybox", "docker", &docker).await;

    let mut tags = client.tags("library/busybox").await.unwrap();
    tags.sort();
    assert_eq!(tags, ["docker", "oci"]);

    let manifest: Value = serde_json::from_slice(&oci.manifest).unwrap();
    let types: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            image::OCI_LAYER_GZIP,
            image::OCI_LAYER_ZSTD,
            image::OCI_LAYER_TAR
        ]
    );
    let manifest: Value = serde_json::from_slice(&docker.manifest).unwrap();
    assert_eq!(manifest["mediaType"], image::DOCKER_MANIFEST);
    assert_eq!(manifest["config"]["mediaType"], image::DOCKER_CONFIG);
    assert_eq!(manifest["layers"][0]["mediaType"], image::DOCKER_LAYER_GZIP);
    // zstd layer 2 is re-compressed with gzip for Docker (same diff id).
    assert_eq!(manifest["layers"][1]["mediaType"], image::DOCKER_LAYER_GZIP);
    assert_eq!(manifest["layers"][2]["mediaType"], image::DOCKER_LAYER_TAR);
    assert_eq!(oci.layers[1].diff_id, docker.layers[1].diff_id);
    assert_ne!(oci.layers[1].digest, docker.layers[1].digest);
}

#[tokio::test]
async fn busybox_config_is_a_valid_oci_config() {
    let image = busybox_image().unwrap().build(ManifestFormat::Oci).unwrap();
    let cfg: Value = serde_json::from_slice(&image.config).unwrap();
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["architecture"], Platform::host().architecture.as_str());
    assert_eq!(cfg["config"]["User"], "app");
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    assert_eq!(cfg["config"]["Cmd"], serde_json::json!(["echo hello"]));
    assert_eq!(
        cfg["config"]["Env"],
        serde_json::json!(["PATH=/bin:/usr/bin", "GREETING=hi"])
    );
    assert_eq!(cfg["config"]["WorkingDir"], "/home/app");
    assert_eq!(cfg["rootfs"]["type"], "layers");
    let diff_ids: Vec<&str> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let want: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(diff_ids, want);
    assert_eq!(cfg["history"].as_array().unwrap().len(), 3);
    assert!(cfg["created"].is_string());
    for layer in &image.layers {
        assert_eq!(sha256_digest(&layer.uncompressed().unwrap()), layer.diff_id);
    }
}

#[tokio::test]
async fn served_busybox_layers_hold_links_whiteouts_and_opaque_dirs() {
    let reg = Registry::start().await.unwrap();
    let client = reg.client().unwrap();
    let image = busybox_image().unwrap().build(ManifestFormat::Oci).unwrap();
    client.push_image("bb", "latest", &image).await.unwrap();

    // Read the layers back from the registry, not from memory.
    let mut served = Vec::new();
    for layer in &image.layers {
        let blob = client.get_blob("bb", &layer.digest).await.unwrap().unwrap();
        let tar = match layer.compression {
            Compression::Gzip => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut out)
                    .unwrap();
                out
            }
            Compression::Zstd => zstd::decode_all(&blob[..]).unwrap(),
            Compression::None => blob.to_vec(),
        };
        assert_eq!(sha256_digest(&tar), layer.diff_id);
        served.push(list_tar(&tar).unwrap());
    }

    let l1 = &served[0];
    let busybox = entry(l1, "bin/busybox");
    assert_eq!(busybox.entry_type, b'0');
    assert_eq!(busybox.mode, 0o755);
    assert_eq!(
        busybox.size,
        std::fs::metadata("/bin/busybox").unwrap().len()
    );
    for applet in ["sh", "ls", "cat", "echo", "sleep", "true", "id"] {
        let e = entry(l1, &format!("bin/{applet}"));
        assert_eq!(e.entry_type, b'2');
        assert_eq!(e.link_name.as_deref(), Some("busybox"));
    }
    assert_eq!(entry(l1, "tmp/").mode, 0o1777);
    let home = entry(l1, "home/app/");
    assert_eq!((home.uid, home.gid, home.entry_type), (1000, 1000, b'5'));
    entry(l1, "var/lib/gone/file");
    entry(l1, "opq/old1");
    entry(l1, "opq/old2");
    assert!(
        std::str::from_utf8(&tar_file(&image.layers[0], "etc/passwd"))
            .unwrap()
            .contains("app:x:1000:1000:")
    );

    let l2 = &served[1];
    let hl = entry(l2, "data/b");
    assert_eq!(hl.entry_type, b'1');
    assert_eq!(hl.link_name.as_deref(), Some("data/a"));
    let pos = |p: &str| l2.iter().position(|e| e.path == p).unwrap();
    assert!(
        pos("data/a") < pos("data/b"),
        "hardlink target must come first"
    );
    assert_eq!(entry(l2, "var/lib/.wh.gone").size, 0);
    assert_eq!(entry(l2, "opq/.wh..wh..opq").entry_type, b'0');
    assert!(pos("opq/") < pos("opq/.wh..wh..opq"));
    assert!(pos("opq/.wh..wh..opq") < pos("opq/new"));
    assert_eq!(entry(l2, "usr/bin/suid").mode, 0o4755);
    assert_eq!(
        entry(l2, "data/xattr").xattrs,
        [("user.berth".to_owned(), b"test".to_vec())]
    );
    let owned = entry(l2, "data/owned");
    assert_eq!((owned.uid, owned.gid, owned.mode), (1000, 1000, 0o600));

    let l3 = &served[2];
    assert_eq!(entry(l3, "etc/motd").size, image::BUSYBOX_MOTD.len() as u64);
}

fn tar_file(layer: &image::Layer, path: &str) -> Vec<u8> {
    let tar = layer.uncompressed().unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == path.as_bytes() {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut out).unwrap();
            return out;
        }
    }
    panic!("{path} not in layer");
}

#[tokio::test]
async fn multi_platform_indexes_round_trip() {
    let reg = Registry::start().await.unwrap();
    let client = reg.client().unwrap();
    for (format, tag) in [
        (ManifestFormat::Oci, "oci"),
        (ManifestFormat::Docker2, "docker"),
    ] {
        let (index, images) = image::multi_platform_index(format).unwrap();
        assert!(images.len() >= 2);
        client
            .push_index("multi", tag, &index, &images)
            .await
            .unwrap();

        let served = client.get_manifest("multi", tag).await.unwrap().unwrap();
        assert_eq!(&served.bytes[..], &index.manifest[..]);
        assert_eq!(served.content_type, format.index_media_type());
        assert_eq!(served.digest.as_deref(), Some(index.digest.as_str()));
        let by_digest = client
            .get_manifest("multi", &index.digest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&by_digest.bytes[..], &index.manifest[..]);

        let reference = reg.image_ref("multi", tag);
        let (ok, raw, err) = skopeo_inspect(&reference, &["--raw"]).await;
        assert!(ok, "{err}");
        assert_eq!(raw.as_bytes(), &index.manifest[..]);
        for image in &images {
            let (ok, out, err) = skopeo_inspect(
                &reference,
                &[
                    "--override-arch",
                    &image.platform.architecture,
                    "--override-os",
                    "linux",
                ],
            )
            .await;
            assert!(ok, "{err}");
            let out: Value = serde_json::from_str(&out).unwrap();
            // skopeo reports the digest of the reference it resolved: the index.
            assert_eq!(out["Digest"], index.digest.as_str());
            assert_eq!(out["Architecture"], image.platform.architecture.as_str());
            let layers: Vec<&str> = out["Layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap())
                .collect();
            let want: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
            assert_eq!(layers, want);
        }
    }
}

#[tokio::test]
async fn foreign_only_index_has_no_host_entry() {
    let reg = Registry::start().await.unwrap();
    let foreign = image::foreign_platform();
    assert_ne!(foreign, Platform::host());
    let (index, images) = image::single_platform_index(&foreign, ManifestFormat::Oci).unwrap();
    image::push_index(&reg.addr(), "foreign", "latest", &index, &images)
        .await
        .unwrap();
    let (ok, _, err) = skopeo_inspect(&reg.image_ref("foreign", "latest"), &[]).await;
    assert!(
        !ok,
        "skopeo resolved a host image from a foreign-only index"
    );
    assert!(
        err.contains("no image found") || err.contains("matching"),
        "{err}"
    );

    let (arm, _) = image::arm64_only_index(ManifestFormat::Docker2).unwrap();
    let parsed: Value = serde_json::from_slice(&arm.manifest).unwrap();
    assert_eq!(parsed["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(parsed["manifests"][0]["platform"]["architecture"], "arm64");
}

#[tokio::test]
async fn basic_auth_registry_rejects_anonymous_and_accepts_credentials() {
    let reg = Registry::start_with_basic_auth("alice", "s3cret pw")
        .await
        .unwrap();
    assert_eq!(reg.credentials(), Some(("alice", "s3cret pw")));
    let anon = RegistryClient::new(&reg.addr()).unwrap();
    let authed = reg.client().unwrap();
    let wrong = RegistryClient::new(&reg.addr())
        .unwrap()
        .with_basic_auth("alice", "nope");

    let resp = anon
        .request(reqwest::Method::GET, "/v2/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    let resp = wrong
        .request(reqwest::Method::GET, "/v2/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = authed
        .request(reqwest::Method::GET, "/v2/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let image = busybox_image().unwrap().build(ManifestFormat::Oci).unwrap();
    assert!(anon.push_image("private", "v1", &image).await.is_err());
    authed.push_image("private", "v1", &image).await.unwrap();

    let path = "/v2/private/manifests/v1";
    let resp = anon
        .request(reqwest::Method::GET, path)
        .header("accept", image::MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let got = authed.get_manifest("private", "v1").await.unwrap().unwrap();
    assert_eq!(&got.bytes[..], &image.manifest[..]);

    let reference = reg.image_ref("private", "v1");
    let (ok, _, _) = skopeo_inspect(&reference, &["--raw", "--no-creds"]).await;
    assert!(!ok, "anonymous skopeo pull succeeded");
    let (ok, raw, err) = skopeo_inspect(&reference, &["--raw", "--creds", "alice:s3cret pw"]).await;
    assert!(ok, "{err}");
    assert_eq!(raw.as_bytes(), &image.manifest[..]);
}

#[tokio::test]
async fn unused_addr_refuses_connections() {
    let addr = registry::unused_addr();
    assert!(addr.starts_with("127.0.0.1:"));
    let err = TcpStream::connect(&addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let other = registry::unused_addr();
    assert_ne!(addr, other);
    assert!(
        RegistryClient::new(&addr)
            .unwrap()
            .blob_exists("x", &sha256_digest(b""))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn raw_manifests_blobs_and_deletes() {
    let reg = Registry::start().await.unwrap();
    let addr = reg.addr();
    let client = reg.client().unwrap();
    let digest = image::push_blob(&addr, "raw", b"hello blob".to_vec())
        .await
        .unwrap();
    assert_eq!(digest, sha256_digest(b"hello blob"));
    assert_eq!(
        &client.get_blob("raw", &digest).await.unwrap().unwrap()[..],
        b"hello blob"
    );
    // Pushing again is a no-op (HEAD finds it).
    assert_eq!(
        image::push_blob(&addr, "raw", b"hello blob".to_vec())
            .await
            .unwrap(),
        digest
    );

    // The registry checks claimed digests.
    assert!(
        client
            .upload_blob(
                "raw",
                &sha256_digest(b"other"),
                bytes::Bytes::from_static(b"lie")
            )
            .await
            .is_err()
    );

    // A hand-made manifest with a non-JSON config pushed as raw bytes.
    let layer = LayerBuilder::new()
        .file("/x", b"x", 0o644)
        .build(Compression::Gzip)
        .unwrap();
    let img = image::Image::from_parts(
        ManifestFormat::Oci,
        b"not json".to_vec(),
        vec![layer],
        Platform::host(),
    );
    client
        .push_blob("raw", bytes::Bytes::from(img.config.clone()))
        .await
        .unwrap();
    client
        .push_blob("raw", img.layers[0].blob.clone())
        .await
        .unwrap();
    let pushed = image::push_raw_manifest(&addr, "raw", "odd", image::OCI_MANIFEST, &img.manifest)
        .await
        .unwrap();
    assert_eq!(pushed, img.manifest_digest);
    assert!(client.get_manifest("raw", "odd").await.unwrap().is_some());

    client
        .delete_manifest("raw", &img.manifest_digest)
        .await
        .unwrap();
    assert!(client.get_manifest("raw", "odd").await.unwrap().is_none());
    assert!(
        client
            .get_manifest("raw", &img.manifest_digest)
            .await
            .unwrap()
            .is_none()
    );
    client.delete_blob("raw", &digest).await.unwrap();
    assert!(client.get_blob("raw", &digest).await.unwrap().is_none());

    // A dangling index entry from hand-written descriptors.
    let idx = Index::from_descriptors(
        ManifestFormat::Oci,
        vec![serde_json::json!({
            "mediaType": image::OCI_MANIFEST,
            "size": 2,
            "digest": sha256_digest(b"{}"),
            "platform": {"os": "linux", "architecture": "amd64"},
        })],
    );
    assert_eq!(idx.digest, sha256_digest(&idx.manifest));
}

#[test]
fn whiteout_and_opaque_names() {
    let l = LayerBuilder::new()
        .whiteout("/var/lib/gone")
        .whiteout("top")
        .opaque("/opq/");
    let entries = list_tar(&l.tar().unwrap()).unwrap();
    let names: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["var/lib/.wh.gone", ".wh.top", "opq/.wh..wh..opq"]);
}

#[test]
fn raw_entries_keep_hostile_names() {
    let long = format!("{}/x", "d".repeat(150));
    let long_link = "l".repeat(300);
    let l = LayerBuilder::new()
        .raw_entry(RawEntry::new("../escape", b'0').data("boom"))
        .raw_entry(RawEntry::new("/abs", b'2').link("../../etc/shadow"))
        .raw_entry(RawEntry::new("hl", b'1').link("/etc/passwd"))
        .raw_entry(RawEntry::new(long.clone(), b'0'))
        .raw_entry(RawEntry::new("sym", b'2').link(long_link.clone()))
        .raw_entry({
            let mut dev = RawEntry::new("dev/null2", b'3');
            dev.device = Some((1, 3));
            dev
        })
        .raw_entry(RawEntry::new("a/../../b", b'5').mode(0o7777));
    let entries = list_tar(&l.tar().unwrap()).unwrap();
    assert_eq!(entries[0].path, "../escape");
    assert_eq!(entries[0].size, 4);
    assert_eq!(entries[1].path, "/abs");
    assert_eq!(entries[1].link_name.as_deref(), Some("../../etc/shadow"));
    assert_eq!(entries[2].entry_type, b'1');
    assert_eq!(entries[2].link_name.as_deref(), Some("/etc/passwd"));
    assert_eq!(entries[3].path, long);
    assert_eq!(entries[4].link_name.as_deref(), Some(long_link.as_str()));
    assert_eq!(entries[5].entry_type, b'3');
    assert_eq!(entries[6].path, "a/../../b");
    assert_eq!(entries[6].mode, 0o7777);
}

#[test]
fn long_paths_use_pax_records() {
    let long = format!("/{}/file", "dir".repeat(60));
    let l = LayerBuilder::new()
        .file(&long, b"x", 0o644)
        .xattr("user.k", b"v");
    let entries = list_tar(&l.tar().unwrap()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].path, &long[1..]);
    assert_eq!(entries[0].xattrs, [("user.k".to_owned(), b"v".to_vec())]);
}

#[test]
fn builder_errors_are_reported() {
    assert!(LayerBuilder::new().xattr("user.k", b"v").tar().is_err());
    assert!(
        LayerBuilder::new()
            .host_file("/x", "/nonexistent/berth")
            .build(Compression::None)
            .is_err()
    );
}

#[test]
fn images_are_deterministic() {
    let a = busybox_image().unwrap().build(ManifestFormat::Oci).unwrap();
    let b = busybox_image().unwrap().build(ManifestFormat::Oci).unwrap();
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_eq!(a.manifest, b.manifest);
    let (i1, _) = image::multi_platform_index(ManifestFormat::Oci).unwrap();
    let (i2, _) = image::multi_platform_index(ManifestFormat::Oci).unwrap();
    assert_eq!(i1.digest, i2.digest);
}

#[test]
fn generated_content_is_about_half_compressible() {
    let data = image::generated_content(7, 1 << 20);
    assert_eq!(data, image::generated_content(7, 1 << 20));
    assert_ne!(data, image::generated_content(8, 1 << 20));
    let l = image::Layer::from_tar(data, Compression::Gzip).unwrap();
    let ratio = l.size() as f64 / f64::from(1u32 << 20);
    assert!((0.4..0.65).contains(&ratio), "ratio {ratio}");
}

#[tokio::test]
async fn big_image_builds_and_pushes() {
    let builder = image::big_image(10, 2).unwrap();
    assert_eq!(builder.layers.len(), 3);
    let image = builder.build(ManifestFormat::Oci).unwrap();
    let uncompressed: usize = image.layers[1..]
        .iter()
        .map(|l| l.uncompressed().unwrap().len())
        .sum();
    assert!(uncompressed >= 10 << 20, "{uncompressed}");
    for layer in &image.layers {
        assert_eq!(sha256_digest(&layer.uncompressed().unwrap()), layer.diff_id);
        assert_eq!(sha256_digest(&layer.blob), layer.digest);
    }
    let entries = image.layers[2].entries().unwrap();
    assert_eq!(entries[0].path, "big/");
    assert_eq!(entries[1].path, "big/l1/");
    assert_eq!(entries[2].path, "big/l1/f0");
    assert_eq!(entries[2].size, 4 << 20);
    let reg = Registry::start().await.unwrap();
    image::push_image(&reg.addr(), "big", "v1", &image)
        .await
        .unwrap();
    let (ok, _, err) = skopeo_inspect(&reg.image_ref("big", "v1"), &["--raw"]).await;
    assert!(ok, "{err}");
}

#[test]
fn image_builder_setters() {
    let b = ImageBuilder::new()
        .user("1000:1000")
        .stop_signal("SIGINT")
        .label("a", "b")
        .platform(Platform::linux("arm64"));
    let cfg = b.config_json();
    assert_eq!(cfg["config"]["User"], "1000:1000");
    assert_eq!(cfg["config"]["StopSignal"], "SIGINT");
    assert_eq!(cfg["config"]["Labels"]["a"], "b");
    assert_eq!(cfg["architecture"], "arm64");
    assert_eq!(cfg["rootfs"]["diff_ids"], serde_json::json!([]));
}
