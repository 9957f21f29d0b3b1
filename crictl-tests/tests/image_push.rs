//! `berth push` and `docker push` against berthd, into a real registry: uploads, "Layer
//! already exists" on a second push, cross-repository mounts, chunked uploads of big blobs,
//! and the errors for a missing image and an unreachable registry. What arrived is checked with
//! skopeo and by pulling it on a fresh berthd root and running it.

use std::process::Output;

use base64::Engine as _;
use crictl_tests::docker::{DockerEnv, docker_busybox, pull_and_run_fresh};
use crictl_tests::image::{ManifestFormat, busybox_base_layer, generated_layer, push_image};
use crictl_tests::registry::{Registry, unused_addr};
use serde_json::Value;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `skopeo inspect` of `reference` on the plain-HTTP test registry.
async fn skopeo_inspect(reference: &str) -> Value {
    let out = tokio::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .await
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("skopeo JSON")
}

/// The `sha256:…` of a `<tag>: digest: sha256:… size: N` line.
fn pushed_digest(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split_once(": digest: ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest line in:\n{out}"))
        .to_owned()
}

/// The lines of per-layer statuses (`<12 hex>: <status>`) in push output.
fn layer_lines(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(id, _)| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(id, s)| (id.to_owned(), s.to_owned()))
        .collect()
}

/// `POST /images/<repo>/push?tag=` straight to the API: its JSON lines.
async fn push_raw(env: &DockerEnv, repo: &str, tag: &str) -> Vec<Value> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-X", "POST", "-H", "X-Registry-Auth: e30="])
        .arg("--unix-socket")
        .arg(&env.d.docker_socket)
        .arg(format!("http://d/v1.44/images/{repo}/push?tag={tag}"))
        .output()
        .await
        .expect("run curl");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn berth_push_uploads_then_finds_every_layer_there_and_a_fresh_root_runs_it() {
    let env = DockerEnv::start("").await;
    env.berth_ok(&["pull", "busybox"]).await;
    let target = env.reg.image_ref("app", "1.0");
    env.berth_ok(&["tag", "busybox", &target]).await;

    let out = env.berth_ok(&["push", &target]).await;
    assert!(
        out.contains(&format!(
            "The push refers to repository [{}/app]",
            env.reg.addr()
        )),
        "{out}"
    );
    let layers = layer_lines(&out);
    assert!(!layers.is_empty(), "{out}");
    assert!(
        layers.iter().any(|(_, s)| s == "Pushed"),
        "every layer was uploaded: {out}"
    );
    assert!(
        layers.iter().all(|(_, s)| s != "Layer already exists"),
        "{out}"
    );
    let digest = pushed_digest(&out);
    assert!(out.contains("1.0: digest: sha256:"), "{out}");

    let log = env.reg.log_tail(400);
    assert!(
        !log.contains("\"PATCH /v2/app/"),
        "small blobs go up in one PUT each:\n{log}"
    );
    let inspected = skopeo_inspect(&target).await;
    assert_eq!(inspected["Digest"], digest.as_str(), "{inspected}");
    let local: Value = serde_json::from_str(&env.berth_ok(&["image", "inspect", &target]).await)
        .expect("inspect JSON");
    // The manifest went up unchanged: same digest as here, same layers.
    let here = &local[0];
    assert_eq!(
        inspected["Layers"].as_array().map(Vec::len),
        here["RootFS"]["Layers"].as_array().map(Vec::len),
    );
    let repo_digests = here["RepoDigests"].to_string();
    assert!(
        repo_digests.contains(&format!("{}/app@{digest}", env.reg.addr())),
        "the push is recorded as docker does: {repo_digests}"
    );

    // Again: nothing to upload.
    let again = env.berth_ok(&["push", &target]).await;
    let layers = layer_lines(&again);
    let finals: Vec<&str> = layers
        .iter()
        .filter(|(_, s)| s != "Preparing")
        .map(|(_, s)| s.as_str())
        .collect();
    assert!(!finals.is_empty(), "{again}");
    assert!(
        finals.iter().all(|s| *s == "Layer already exists"),
        "{again}"
    );
    assert_eq!(pushed_digest(&again), digest);
    assert_eq!(
        env.berth_ok(&["push", "-q", &target]).await,
        format!("{target}\n")
    );

    let ran = pull_and_run_fresh(&target, &["echo", "pushed and pulled"]).await;
    assert_eq!(ran, "pushed and pulled\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_push_works_and_a_second_repository_mounts_the_blobs() {
    let env = DockerEnv::start("").await;
    env.ok(&["pull", "busybox"]).await;
    let first = env.reg.image_ref("app", "2.0");
    env.ok(&["tag", "busybox", &first]).await;
    let out = env.ok(&["push", &first]).await;
    assert!(
        out.contains(&format!(
            "The push refers to repository [{}/app]",
            env.reg.addr()
        )),
        "{out}"
    );
    assert!(out.contains(": Pushed"), "{out}");
    let digest = pushed_digest(&out);
    assert!(
        out.contains(&format!("2.0: digest: {digest} size: ")),
        "{out}"
    );
    assert_eq!(skopeo_inspect(&first).await["Digest"], digest.as_str());

    let again = env.ok(&["push", &first]).await;
    assert!(again.contains(": Layer already exists"), "{again}");
    assert!(!again.contains(": Pushed"), "{again}");

    // Same registry, other repository: the layers are mounted from the first, not uploaded.
    let second = env.reg.image_ref("team/copy", "2.0");
    env.ok(&["tag", "busybox", &second]).await;
    let out = env.ok(&["push", &second]).await;
    assert!(out.contains(": Mounted from app"), "{out}");
    assert!(!out.contains(": Pushed"), "{out}");
    assert_eq!(pushed_digest(&out), digest);
    let log = env.reg.log_tail(400);
    assert!(
        log.lines()
            .any(|l| l.contains("/v2/team/copy/blobs/uploads/")
                && l.contains("mount=")
                && l.contains("201")),
        "the registry saw a mount answered 201:\n{log}"
    );
    assert_eq!(skopeo_inspect(&second).await["Digest"], digest.as_str());

    // No tag: every tag of the repository (docker push --all-tags).
    let third = env.reg.image_ref("app", "3.0");
    env.ok(&["tag", "busybox", &third]).await;
    let all = env
        .ok(&["push", "--all-tags", &format!("{}/app", env.reg.addr())])
        .await;
    assert!(
        all.contains("2.0: digest:") && all.contains("3.0: digest:"),
        "{all}"
    );
    assert_eq!(skopeo_inspect(&third).await["Digest"], digest.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_above_the_chunk_size_go_up_in_chunks() {
    // 1 MiB chunks; a layer of ~4 MiB generated content (about half compressible).
    let env = DockerEnv::start("[push]\nchunk_bytes = 1048576\n").await;
    let big = tokio::task::spawn_blocking(|| generated_layer(7, 4 << 20, 4 << 20))
        .await
        .expect("join")
        .expect("big layer");
    let blob_size = big.size();
    assert!(
        blob_size > 1 << 20,
        "the layer must need chunks: {blob_size}"
    );
    let img = docker_busybox()
        .layer(big)
        .build(ManifestFormat::Docker2)
        .expect("build");
    push_image(&env.reg.addr(), "library/big", "latest", &img)
        .await
        .expect("seed the mirror");
    env.berth_ok(&["pull", "big"]).await;
    let target = env.reg.image_ref("chunky", "1");
    env.berth_ok(&["tag", "big", &target]).await;
    let out = env.berth_ok(&["push", &target]).await;
    assert_eq!(
        layer_lines(&out)
            .iter()
            .filter(|(_, s)| s == "Pushed")
            .count(),
        2,
        "{out}"
    );
    // Every blob above 1 MiB (the busybox layer is one too) went up in 1 MiB PATCHes; the
    // rest in one PUT each.
    let want: usize = img
        .layers
        .iter()
        .map(|l| l.size())
        .filter(|&n| n > 1 << 20)
        .map(|n| n.div_ceil(1 << 20))
        .sum();
    assert!(want >= 3, "{want}");
    let log = env.reg.log_tail(1000);
    let patches = log
        .lines()
        .filter(|l| l.contains("\"PATCH /v2/chunky/blobs/uploads/") && l.contains(" 202 "))
        .count();
    assert_eq!(patches, want, "PATCH chunks the registry saw:\n{log}");
    assert_eq!(pushed_digest(&out), img.manifest_digest);
    // A Docker schema 2 manifest stays one: same bytes, same media type.
    let inspected = skopeo_inspect(&target).await;
    assert_eq!(inspected["Digest"], img.manifest_digest.as_str());
    let raw = env
        .reg
        .client()
        .expect("client")
        .get_manifest("chunky", "1")
        .await
        .expect("manifest")
        .expect("the registry has it");
    assert_eq!(raw.content_type, img.manifest_media_type);
    assert_eq!(raw.bytes.as_ref(), img.manifest.as_slice());

    // The raw stream, as docker clients read it: per-layer progress with byte counts.
    let other = Registry::start().await.expect("second registry");
    let raw_target = other.image_ref("raw", "1");
    env.berth_ok(&["tag", "big", &raw_target]).await;
    let lines = push_raw(&env, &format!("{}/raw", other.addr()), "1").await;
    let status = |s: &str| lines.iter().filter(|v| v["status"] == s).count();
    assert_eq!(
        lines[0]["status"],
        format!("The push refers to repository [{}/raw]", other.addr())
    );
    assert_eq!(status("Preparing"), 2, "{lines:#?}");
    assert_eq!(status("Pushed"), 2, "{lines:#?}");
    let pushing: Vec<&Value> = lines.iter().filter(|v| v["status"] == "Pushing").collect();
    assert!(!pushing.is_empty(), "{lines:#?}");
    for p in &pushing {
        assert_eq!(p["id"].as_str().map(str::len), Some(12), "{p}");
        assert!(
            p["progressDetail"]["current"].as_u64() <= p["progressDetail"]["total"].as_u64(),
            "{p}"
        );
        assert!(
            p["progress"].as_str().is_some_and(|b| b.starts_with('[')),
            "{p}"
        );
    }
    let last = lines.last().expect("lines");
    assert_eq!(last["aux"]["Tag"], "1", "{last}");
    assert_eq!(
        last["aux"]["Digest"],
        img.manifest_digest.as_str(),
        "{last}"
    );
    assert_eq!(last["aux"]["Size"], img.manifest.len(), "{last}");
    assert_eq!(
        lines[lines.len() - 2]["status"],
        format!(
            "1: digest: {} size: {}",
            img.manifest_digest,
            img.manifest.len()
        )
    );

    let ran = pull_and_run_fresh(&target, &["wc", "-c", "/big/l7/f0"]).await;
    assert_eq!(ran.split_whitespace().next(), Some("4194304"), "{ran}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_images_and_unreachable_registries_fail_clearly() {
    let env = DockerEnv::start("").await;
    let absent = env.reg.image_ref("nothere", "1");
    let out = env.berth(&["push", &absent]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let shown = format!(
        "An image does not exist locally with the tag: {}/nothere",
        env.reg.addr()
    );
    assert!(stderr(&out).contains(&shown), "{}", stderr(&out));
    let out = env.docker(&["push", &absent]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains(&shown), "{}", stderr(&out));
    // The status is docker's 404, before any stream.
    let curl = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg("--unix-socket")
        .arg(&env.d.docker_socket)
        .arg(format!(
            "http://d/v1.44/images/{}/nothere/push?tag=1",
            env.reg.addr()
        ))
        .output()
        .await
        .expect("run curl");
    assert_eq!(stdout(&curl), "404");

    env.berth_ok(&["pull", "busybox"]).await;
    let nowhere = format!("{}/app:1", unused_addr());
    env.berth_ok(&["tag", "busybox", &nowhere]).await;
    let out = env.berth(&["push", &nowhere]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    let host = nowhere.split('/').next().expect("host");
    assert!(
        err.contains(&format!("push {nowhere}"))
            && err.contains(host)
            && err.to_ascii_lowercase().contains("connection refused"),
        "the error names the registry and the cause: {err}"
    );
    let out = env.docker(&["push", &nowhere]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains(host), "{}", stderr(&out));
}

/// A registry that wants credentials gets them from `X-Registry-Auth`, as for pulls.
#[tokio::test(flavor = "multi_thread")]
async fn docker_push_with_basic_auth() {
    let env = DockerEnv::start("").await;
    let reg = Registry::start_with_basic_auth("pusher", "s3cret")
        .await
        .expect("auth registry");
    env.ok(&["pull", "busybox"]).await;
    let target = reg.image_ref("secured", "1");
    env.ok(&["tag", "busybox", &target]).await;
    let denied = env.docker(&["push", &target]).await;
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    assert!(stderr(&denied).contains("401"), "{}", stderr(&denied));
    // As `docker login` leaves it (berthd has no `POST /auth` to check credentials with).
    let auth = base64::engine::general_purpose::STANDARD.encode("pusher:s3cret");
    std::fs::write(
        env.config_dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .expect("write docker config");
    let out = env.ok(&["push", &target]).await;
    assert!(out.contains(": Pushed"), "{out}");
    let digest = pushed_digest(&out);
    let listed = reg
        .client()
        .expect("client")
        .tags("secured")
        .await
        .expect("tags");
    assert_eq!(listed, vec!["1".to_owned()]);
    assert!(!digest.is_empty());
}

/// A token-auth registry: berthd fetches a `pull,push` token with the client's credentials.
#[tokio::test(flavor = "multi_thread")]
async fn docker_push_through_the_bearer_token_flow() {
    use crictl_tests::token::{TokenServer, TokenServerConfig};
    let env = DockerEnv::start("").await;
    let tokens = TokenServer::start(TokenServerConfig::new("pusher", "t0ken"))
        .await
        .expect("token server");
    let reg = Registry::start_with_token_auth(
        &tokens.realm(),
        tokens.service(),
        tokens.issuer(),
        tokens.cert_pem(),
    )
    .await
    .expect("token registry");
    env.ok(&["pull", "busybox"]).await;
    let auth = base64::engine::general_purpose::STANDARD.encode("pusher:t0ken");
    std::fs::write(
        env.config_dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .expect("write docker config");
    let first = reg.image_ref("team/app", "1");
    env.ok(&["tag", "busybox", &first]).await;
    let out = env.ok(&["push", &first]).await;
    assert!(out.contains(": Pushed"), "{out}");
    let digest = pushed_digest(&out);
    let again = env.ok(&["push", &first]).await;
    assert!(again.contains(": Layer already exists"), "{again}");
    // The mount needs pull access to the source repository as well as push to the target.
    let second = reg.image_ref("team/other", "1");
    env.ok(&["tag", "busybox", &second]).await;
    let out = env.ok(&["push", &second]).await;
    assert!(
        out.contains(": Mounted from team/app"),
        "{out}\n{}",
        reg.log_tail(60)
    );
    assert_eq!(pushed_digest(&out), digest);
}

/// An image made here (`import` of a rootfs tar: an uncompressed layer and a manifest berthd
/// wrote) pushes like a pulled one and runs elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn an_imported_image_pushes_and_runs_on_a_fresh_root() {
    let env = DockerEnv::start("").await;
    let rootfs = busybox_base_layer().tar().expect("rootfs tar");
    let target = env.reg.image_ref("imported", "1");
    let out = env
        .berth_with_input(
            &["import", "--change", "CMD [\"sh\"]", "-", &target],
            Some(&rootfs),
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.berth_ok(&["push", &target]).await;
    assert!(
        layer_lines(&out).iter().any(|(_, s)| s == "Pushed"),
        "{out}"
    );
    let digest = pushed_digest(&out);
    assert_eq!(skopeo_inspect(&target).await["Digest"], digest.as_str());
    let ran = pull_and_run_fresh(&target, &["echo", "imported"]).await;
    assert_eq!(ran, "imported\n");
}
