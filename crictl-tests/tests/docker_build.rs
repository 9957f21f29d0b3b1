//! Dockerfile builds and commits through the stock docker client (its classic builder path,
//! `DOCKER_BUILDKIT=0`) and the `berth` CLI, against a real berthd: multi-stage builds with
//! every instruction, `.dockerignore`, the cache, a failing RUN, `FROM scratch`, ADD of
//! archives and URLs, and `commit`.

use std::path::Path;
use std::process::Output;

use crictl_tests::docker::{DockerEnv, pull_and_run_fresh, tail};

const LEGACY: &[(&str, &str)] = &[("DOCKER_BUILDKIT", "0")];

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `docker build` (classic builder) that must succeed; its stdout.
async fn docker_build(env: &DockerEnv, args: &[&str]) -> String {
    let mut all = vec!["build"];
    all.extend_from_slice(args);
    let out = env.docker_full(&all, LEGACY, None).await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "docker {all:?} failed with {}:\nstdout: {stdout}\nstderr: {stderr}\nberthd log tail:\n{}",
        out.status,
        tail(&env.d.log(), 40)
    );
    stdout
}

fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}

/// A tar holding `entries` (path, content) as regular files.
fn tar_of(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_bytes())
            .expect("append");
    }
    b.into_inner().expect("tar")
}

/// Waits (30 s at most) until a build's RUN container runs.
async fn wait_for_a_run_step(env: &DockerEnv) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while env
        .ok(&["ps", "-q", "--filter", "label=io.berth.build=true"])
        .await
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the RUN step never started:\n{}",
            tail(&env.d.log(), 30)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits (20 s at most) until no container is left.
async fn wait_for_no_container(env: &DockerEnv, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = env.ok(&["ps", "-aq"]).await;
        if left.trim().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} is still there: {left}\n{}",
            tail(&env.d.log(), 30)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

const MULTI_STAGE: &str = r#"# syntax=docker/dockerfile:1
# A build that compiles nothing: it copies between stages.
ARG BASE=busybox
FROM ${BASE} AS first
ARG GREETING=hello
ENV APP_HOME=/app \
    MODE=test
WORKDIR $APP_HOME
COPY greet.txt ./
COPY src/ src/
COPY *.conf /etc/app/
COPY . /all/
RUN echo "$GREETING from ${MODE:-none} ${UNSET:-dflt}" > made.txt && cat greet.txt
RUN <<EOF
echo heredoc-run > /app/heredoc.txt
EOF
RUN ["/bin/sh", "-c", "echo exec-form > /app/exec.txt"]
COPY <<EOF /app/inline.txt
inline ${MODE}
EOF
ADD files.tar /opt/
ADD files.tar.gz /opt/gz/

FROM busybox AS final
LABEL org.example.name="final app" version=1.0
MAINTAINER someone@example.com
ENV MODE=prod
ENV LEGACY legacy form value
COPY --from=first /app /app
COPY --from=first --chown=app:app /opt /opt
COPY --from=0 /all /all
RUN test "$(stat -c %u:%g /opt/inner/f.txt)" = "1000:1000"
USER app
WORKDIR /app/work
EXPOSE 8080/tcp 53/udp
VOLUME /data
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD ["true"]
SHELL ["/bin/sh", "-c"]
ONBUILD RUN echo triggered
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /app/made.txt /app/heredoc.txt /app/exec.txt /app/inline.txt /opt/inner/f.txt /opt/gz/z.txt /app/greet.txt && id -u && pwd && echo $MODE $LEGACY && ls /all"]
"#;

fn multi_stage_context(dir: &Path) {
    write(dir, "Dockerfile", MULTI_STAGE);
    write(dir, "greet.txt", "greetings\n");
    write(dir, "src/main.txt", "main\n");
    write(dir, "a.conf", "a\n");
    write(dir, "b.conf", "b\n");
    write(dir, "secret.key", "do not send\n");
    write(dir, "ignored/x", "x\n");
    write(dir, ".dockerignore", "*.key\nignored\n");
    std::fs::write(
        dir.join("files.tar"),
        tar_of(&[("inner/f.txt", "from tar\n")]),
    )
    .expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar_of(&[("z.txt", "from tar.gz\n")])).expect("gz");
    std::fs::write(dir.join("files.tar.gz"), gz.finish().expect("gz")).expect("write");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_stage_build_with_every_instruction_runs_as_written_and_caches() {
    let env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    multi_stage_context(ctx.path());
    let dir = ctx.path().to_str().expect("utf-8");

    let first = docker_build(&env, &["-t", "app:1.0", dir]).await;
    assert!(first.contains("Step 1/"), "{first}");
    assert!(first.contains("greetings"), "RUN output is shown:\n{first}");
    assert!(first.contains("Successfully tagged app:1.0"), "{first}");
    assert!(!first.contains("Using cache"), "{first}");

    let out = env.ok(&["run", "--rm", "app:1.0"]).await;
    assert_eq!(
        out,
        "hello from test dflt\nheredoc-run\nexec-form\ninline test\nfrom tar\nfrom tar.gz\ngreetings\n1000\n/app/work\nprod legacy form value\nDockerfile\na.conf\nb.conf\nfiles.tar\nfiles.tar.gz\ngreet.txt\nsrc\n",
        "the image's CMD/ENTRYPOINT/ENV/WORKDIR/USER, and what .dockerignore left out"
    );
    let inspect = env
        .ok(&[
            "image",
            "inspect",
            "-f",
            "{{.Config.User}}|{{.Config.WorkingDir}}|{{json .Config.ExposedPorts}}|{{json .Config.Volumes}}|{{.Config.StopSignal}}|{{json .Config.Healthcheck.Test}}|{{json .Config.OnBuild}}|{{index .Config.Labels \"org.example.name\"}}|{{.Author}}|{{json .Config.Entrypoint}}",
            "app:1.0",
        ])
        .await;
    assert_eq!(
        inspect.trim(),
        r#"app|/app/work|{"53/udp":{},"8080/tcp":{}}|{"/data":{}}|SIGTERM|["CMD","true"]|["RUN echo triggered"]|final app|someone@example.com|["/bin/sh","-c"]"#
    );
    let history = env
        .ok(&[
            "history",
            "--no-trunc",
            "--format",
            "{{.CreatedBy}}",
            "app:1.0",
        ])
        .await;
    assert!(history.contains("ONBUILD RUN echo triggered"), "{history}");
    let id1 = env
        .ok(&["image", "inspect", "-f", "{{.Id}}", "app:1.0"])
        .await;

    // The same build again: every step from the cache, the same image.
    let second = docker_build(&env, &["-t", "app:1.0", dir]).await;
    assert!(second.contains("Using cache"), "{second}");
    assert!(second.contains("CACHED"), "{second}");
    assert!(!second.contains("Running in"), "nothing ran:\n{second}");
    let id2 = env
        .ok(&["image", "inspect", "-f", "{{.Id}}", "app:1.0"])
        .await;
    assert_eq!(id1, id2);

    // A changed input: the steps up to it come from the cache, it and those after it run.
    write(ctx.path(), "greet.txt", "changed greetings\n");
    let third = docker_build(&env, &["-t", "app:1.1", dir]).await;
    let (before, after) = third
        .split_once("COPY greet.txt ./")
        .expect("the COPY step is shown");
    assert!(
        before.contains("Using cache"),
        "WORKDIR came from the cache:\n{third}"
    );
    assert!(
        after.contains("Running in"),
        "the RUN after the change ran:\n{third}"
    );
    assert!(after.contains("changed greetings"), "{third}");
    let out = env
        .ok(&[
            "run",
            "--rm",
            "--entrypoint",
            "cat",
            "app:1.1",
            "/app/greet.txt",
        ])
        .await;
    assert_eq!(out, "changed greetings\n");

    // --no-cache runs everything again.
    let fourth = docker_build(&env, &["--no-cache", "-t", "app:1.2", dir]).await;
    assert!(!fourth.contains("Using cache"), "{fourth}");

    // app:1.0 as a base: its ONBUILD trigger runs first; SHELL changes what shell-form
    // commands run with; ${VAR:+alt} and --platform as docker takes them.
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let child = tempfile::tempdir().expect("child context");
    write(
        child.path(),
        "Dockerfile",
        &format!(
            "FROM --platform=linux/{arch} app:1.0\nSHELL [\"/bin/sh\", \"-ec\"]\nENV WHO=${{MODE:+mode-is-set}} NONE=${{NOPE:+x}}\nRUN echo \"child $WHO [$NONE]\"\nCMD echo shell-form\n"
        ),
    );
    let out = docker_build(
        &env,
        &["-t", "child:1", child.path().to_str().expect("utf-8")],
    )
    .await;
    assert!(out.contains("triggered"), "the base's ONBUILD ran:\n{out}");
    assert!(out.contains("child mode-is-set []"), "{out}");
    assert_eq!(
        env.ok(&[
            "image",
            "inspect",
            "-f",
            "{{json .Config.Cmd}} {{json .Config.OnBuild}}",
            "child:1"
        ])
        .await
        .trim(),
        r#"["/bin/sh","-ec","echo shell-form"] null"#
    );
    write(
        child.path(),
        "Dockerfile",
        "FROM --platform=plan9/mips app:1.0\n",
    );
    let out = env
        .docker_full(
            &["build", child.path().to_str().expect("utf-8")],
            LEGACY,
            None,
        )
        .await;
    assert!(!out.status.success());
    assert!(text(&out).1.contains("plan9/mips"), "{}", text(&out).1);

    // The steps' images are out of sight, as docker's intermediates are.
    let images = env
        .ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .await;
    assert!(!images.contains("<none>"), "{images}");
    env.ok(&["builder", "prune", "-f"]).await;
    let again = docker_build(&env, &["-t", "app:1.0", dir]).await;
    assert!(
        !again.contains("Using cache"),
        "the cache went with builder prune:\n{again}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_run_reports_its_output_and_code_and_tags_nothing() {
    let env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN echo ok-step\nRUN echo before-the-failure && exit 3\nRUN echo never\n",
    );
    let dir = ctx.path().to_str().expect("utf-8");
    let out = env
        .docker_full(&["build", "-t", "broken:1", dir], LEGACY, None)
        .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("before-the-failure"), "{stdout}");
    assert!(
        stderr.contains("returned a non-zero code: 3"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(!stdout.contains("never"), "{stdout}");
    let missing = env.docker(&["image", "inspect", "broken:1"]).await;
    assert!(!missing.status.success(), "no image is tagged");
    // No container of the build is left behind.
    assert_eq!(env.ok(&["ps", "-aq"]).await, "");

    // A parse error names the file, line and instruction.
    write(ctx.path(), "Dockerfile", "FROM busybox\nCOPY\n");
    let out = env
        .docker_full(&["build", "-t", "broken:2", dir], LEGACY, None)
        .await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Dockerfile:2") && stderr.contains("COPY"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // A missing source is a clear error.
    write(ctx.path(), "Dockerfile", "FROM busybox\nCOPY nope.txt /\n");
    let out = env.docker_full(&["build", dir], LEGACY, None).await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("nope.txt"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn from_scratch_add_urls_and_commit() {
    let env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    let rootfs = crictl_tests::image::busybox_base_layer()
        .tar()
        .expect("busybox rootfs");
    std::fs::write(ctx.path().join("rootfs.tar"), rootfs).expect("write");
    write(
        ctx.path(),
        "Dockerfile",
        &format!(
            "FROM scratch\nADD rootfs.tar /\nADD http://{}/v2/_catalog /fetched/\nCMD [\"/bin/sh\", \"-c\", \"echo scratch-ok; cat /fetched/_catalog\"]\n",
            env.reg.addr()
        ),
    );
    let dir = ctx.path().to_str().expect("utf-8");
    docker_build(&env, &["-t", "mini:1", dir]).await;
    let out = env.ok(&["run", "--rm", "mini:1"]).await;
    assert!(out.starts_with("scratch-ok\n{\"repositories\""), "{out}");
    let layers = env
        .ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", "mini:1"])
        .await;
    assert_eq!(layers.trim(), "2");

    // An unreachable URL is a clear error.
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nADD http://127.0.0.1:1/nothing.txt /x\n",
    );
    let out = env.docker_full(&["build", dir], LEGACY, None).await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot fetch http://127.0.0.1:1/nothing.txt"),
        "{stderr}"
    );

    // commit: the container's changes (a file written, a file deleted) become a layer, with
    // the changes asked for.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "changing",
        "busybox",
        "sh",
        "-c",
        "echo changed > /etc/motd; rm /var/lib/gone/file; exec sleep 300",
    ])
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env
        .docker(&["exec", "changing", "cat", "/etc/motd"])
        .await
        .stdout
        != b"changed\n"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the container never wrote"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = env
        .ok(&[
            "commit",
            "-m",
            "snapshot of changing",
            "-a",
            "tester",
            "-c",
            "CMD [\"sh\", \"-c\", \"cat /etc/motd; test -e /var/lib/gone/file || echo gone\"]",
            "-c",
            "ENV COMMITTED=yes",
            "changing",
            "snap:1",
        ])
        .await;
    assert!(id.starts_with("sha256:"), "{id}");
    // It kept running (paused and thawed).
    assert_eq!(
        env.ok(&["inspect", "-f", "{{.State.Status}}", "changing"])
            .await,
        "running\n"
    );
    assert_eq!(env.ok(&["run", "--rm", "snap:1"]).await, "changed\ngone\n");
    assert_eq!(
        env.ok(&[
            "image",
            "inspect",
            "-f",
            "{{.Author}}|{{.Comment}}|{{index .Config.Env 1}}",
            "snap:1"
        ])
        .await,
        "tester|snapshot of changing|COMMITTED=yes\n"
    );
    env.ok(&["rm", "-f", "changing"]).await;

    // The built and the committed image push to a registry and run from a fresh root.
    for (local, remote) in [("mini:1", "built/mini:1"), ("snap:1", "built/snap:1")] {
        let remote = format!("{}/{remote}", env.reg.addr());
        env.ok(&["tag", local, &remote]).await;
        let pushed = env.ok(&["push", &remote]).await;
        assert!(pushed.contains("digest: sha256:"), "{pushed}");
    }
    let mini = pull_and_run_fresh(&format!("{}/built/mini:1", env.reg.addr()), &[]).await;
    assert!(mini.starts_with("scratch-ok\n"), "{mini}");
    let snap = pull_and_run_fresh(&format!("{}/built/snap:1", env.reg.addr()), &[]).await;
    assert_eq!(snap, "changed\ngone\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_berth_cli_builds_and_commits() {
    let env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    write(ctx.path(), "Dockerfile", MULTI_STAGE);
    multi_stage_context(ctx.path());
    // -f from another directory, --build-arg, --target, more than one -t.
    let other = tempfile::tempdir().expect("other");
    write(
        other.path(),
        "Dockerfile.dev",
        "FROM busybox AS base\nARG WHO\nRUN echo \"built for $WHO\" > /who\nFROM base AS second\nCMD [\"cat\", \"/who\"]\nFROM busybox\nRUN exit 9\n",
    );
    let dockerfile = other.path().join("Dockerfile.dev");
    let dir = ctx.path().to_str().expect("utf-8");
    let out = env
        .berth_ok(&[
            "build",
            "-f",
            dockerfile.to_str().expect("utf-8"),
            "--build-arg",
            "WHO=berth",
            "--target",
            "second",
            "--label",
            "team=build",
            "-t",
            "dev:1",
            "-t",
            "dev:latest",
            dir,
        ])
        .await;
    assert!(out.contains("Successfully tagged dev:latest"), "{out}");
    assert_eq!(
        env.berth_ok(&["run", "--rm", "dev:1"]).await,
        "built for berth\n"
    );
    assert_eq!(
        env.berth_ok(&["run", "--rm", "dev:latest"]).await,
        "built for berth\n"
    );
    assert_eq!(
        env.berth_ok(&[
            "inspect",
            "--type",
            "image",
            "-f",
            "{{index .Config.Labels \"team\"}}",
            "dev:1"
        ])
        .await,
        "build\n",
        "--label reaches the image"
    );

    // The failing last stage is built when it is the target: exit code 9.
    let failed = env
        .berth(&["build", "-f", dockerfile.to_str().expect("utf-8"), dir])
        .await;
    assert_eq!(failed.status.code(), Some(9), "{}", text(&failed).1);

    // A Dockerfile on stdin, -q prints the id only.
    let quiet = env
        .berth_with_input(
            &["build", "-q", "-t", "stdin:1", "-"],
            Some(b"FROM busybox\nCMD [\"echo\", \"from stdin\"]\n"),
        )
        .await;
    let (stdout, stderr) = text(&quiet);
    assert!(quiet.status.success(), "{stderr}");
    assert!(
        stdout.trim().starts_with("sha256:") && stdout.lines().count() == 1,
        "{stdout}"
    );
    assert_eq!(
        env.berth_ok(&["run", "--rm", "stdin:1"]).await,
        "from stdin\n"
    );

    // berth commit, with --change and no pause.
    env.berth_ok(&[
        "run",
        "-d",
        "--name",
        "c1",
        "busybox",
        "sh",
        "-c",
        "echo v1 > /v; exec sleep 300",
    ])
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env.berth(&["exec", "c1", "cat", "/v"]).await.stdout != b"v1\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the container never wrote"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = env
        .berth_ok(&[
            "commit",
            "--pause=false",
            "-c",
            "CMD cat /v",
            "c1",
            "committed:v1",
        ])
        .await;
    assert!(id.starts_with("sha256:"), "{id}");
    assert_eq!(env.berth_ok(&["run", "--rm", "committed:v1"]).await, "v1\n");
    let bad = env.berth(&["commit", "-c", "RUN true", "c1", "x:1"]).await;
    assert!(!bad.status.success());
    assert!(
        text(&bad).1.contains("not a valid change command"),
        "{}",
        text(&bad).1
    );
    let missing = env.berth(&["commit", "nosuch", "x:1"]).await;
    assert!(!missing.status.success());
    assert!(
        text(&missing).1.contains("No such container"),
        "{}",
        text(&missing).1
    );
    env.berth_ok(&["rm", "-f", "c1"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_cut_short_by_a_berthd_crash_leaves_no_container_behind() {
    let mut env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    write(ctx.path(), "f", "x\n");
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nCOPY f /f\nRUN sleep 120\n",
    );
    let mut build =
        env.berth_command(&["build", "-t", "cut:1", ctx.path().to_str().expect("utf-8")]);
    build
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = build.spawn().expect("berth build");
    wait_for_a_run_step(&env).await;
    env.d.kill9().await.expect("kill berthd");
    let _ = child.kill().await;
    env.d.restart().await.expect("restart berthd");
    wait_for_no_container(&env, "the build's container").await;
    let missing = env.docker(&["image", "inspect", "cut:1"]).await;
    assert!(!missing.status.success(), "no image is tagged");
    let builds = env.d.root().join("builds");
    let leftovers: Vec<_> = std::fs::read_dir(&builds)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "scratch files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_its_build() {
    let env = DockerEnv::start("").await;
    let ctx = tempfile::tempdir().expect("context");
    write(
        ctx.path(),
        "Dockerfile",
        "FROM busybox\nRUN sleep 120\nRUN echo never\n",
    );
    let mut build =
        env.berth_command(&["build", "-t", "gone:1", ctx.path().to_str().expect("utf-8")]);
    build
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = build.spawn().expect("berth build");
    wait_for_a_run_step(&env).await;
    child.kill().await.expect("kill the client");
    // The RUN is killed and its container removed, well before its 120 s.
    wait_for_no_container(&env, "the cancelled build's container").await;
    let missing = env.docker(&["image", "inspect", "gone:1"]).await;
    assert!(!missing.status.success(), "no image is tagged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_image_behind_basic_auth_is_pulled_with_the_clients_credentials() {
    use base64::Engine as _;
    let env = DockerEnv::start("").await;
    let reg = crictl_tests::registry::Registry::start_with_basic_auth("builder", "pa55")
        .await
        .expect("auth registry");
    env.ok(&["pull", "busybox"]).await;
    let base = reg.image_ref("private/base", "1");
    env.ok(&["tag", "busybox", &base]).await;
    let config = env.config_dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("builder:pa55");
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .expect("write docker config");
    env.ok(&["push", &base]).await;
    env.ok(&["rmi", &base]).await;
    let ctx = tempfile::tempdir().expect("context");
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {base}\nRUN echo from-the-private-base\n"),
    );
    let dir = ctx.path().to_str().expect("utf-8");
    // The client sends its credentials (X-Registry-Config); berthd pulls the base with them.
    let out = docker_build(&env, &["-t", "priv:1", dir]).await;
    assert!(out.contains("from-the-private-base"), "{out}");
    // Without them the registry says no, and the build says so.
    env.ok(&["rmi", "priv:1", &base]).await;
    std::fs::remove_file(&config).expect("remove docker config");
    let out = env.docker_full(&["build", dir], LEGACY, None).await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("unauthorized"),
        "{stderr}"
    );
}
