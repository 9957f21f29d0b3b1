//! ExecSync against a real berthd: output and exit codes, the deadline, a background child
//! that keeps stdout open, the output cap, and the container's confinement applied to the
//! exec'd process (user, capabilities, no_new_privs, seccomp, cgroup).

use std::time::{Duration, Instant};

use api::cri;
use crictl_tests::pods::{
    self, Env, assert_clean, create, ctr_config, env, pid_mode, remove_pod, run_pod_with, start,
    status,
};
use tonic::Code;

/// ExecSync keeps at most this much per stream (berthd's `MAX_OUTPUT`).
const MAX_OUTPUT: usize = 8 * 1024 * 1024 - 64 * 1024;

/// As kubelet asks for pods without shareProcessNamespace: PID 1 is the container's.
fn pod_config(env: &Env, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        linux: pid_mode(cri::NamespaceMode::Container),
        ..pods::pod_config(env, name)
    }
}

fn sleeper(env: &Env, name: &str, sc: cri::LinuxContainerSecurityContext) -> cri::ContainerConfig {
    cri::ContainerConfig {
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..ctr_config(env, name, &["sleep", "3600"])
    }
}

/// A pod with one running `sleep` container; returns (pod id, container id).
async fn running(
    env: &Env,
    name: &str,
    sc: cri::LinuxContainerSecurityContext,
) -> (String, String) {
    let pod = run_pod_with(env, pod_config(env, name)).await;
    let ctr = create(env, &pod, sleeper(env, name, sc))
        .await
        .expect("create");
    start(env, &ctr).await;
    (pod.0, ctr)
}

use crictl_tests::pods::exec_sync as exec;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// No `exec-*.json` process file is left in any bundle.
fn no_process_files(env: &Env) {
    let dir = env.d.state().join("containers");
    for bundle in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(bundle.path()).expect("bundle").flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with("exec-"), "left in a bundle: {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_output_exit_codes_and_bad_input() {
    let env = env().await;
    let (pod, ctr) = running(&env, "execbasic", Default::default()).await;

    let r = exec(&env, &ctr, &["echo", "hello", "world"], 10)
        .await
        .expect("exec");
    assert_eq!(text(&r.stdout), "hello world\n");
    assert_eq!(text(&r.stderr), "");
    assert_eq!(r.exit_code, 0);

    let r = exec(
        &env,
        &ctr,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        0,
    )
    .await
    .expect("exec");
    assert_eq!(
        (text(&r.stdout), text(&r.stderr)),
        ("out\n".into(), "err\n".into())
    );
    assert_eq!(r.exit_code, 3);

    // Killed by a signal: 128 + signal, as shells and kubelet read it.
    let r = exec(&env, &ctr, &["sh", "-c", "kill -9 $$"], 10)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 137);

    // The image's env and working dir, and a short id prefix works as the container id.
    let r = exec(
        &env,
        &ctr[..12],
        &["sh", "-c", "echo $PATH $GREETING; pwd"],
        10,
    )
    .await
    .expect("exec by id prefix");
    assert_eq!(text(&r.stdout), "/bin:/usr/bin hi\n/home/app\n");

    // Bad input: clear errors, nothing else changes.
    let e = exec(&env, &ctr, &[], 10).await.expect_err("empty command");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = exec(&env, &ctr, &["/no/such/binary"], 10)
        .await
        .expect_err("missing binary");
    assert!(e.message().contains("/no/such/binary"), "{e:?}");
    let e = exec(&env, "0123456789abcdef", &["true"], 10)
        .await
        .expect_err("unknown container");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let s = status(&env, &ctr).await.expect("status");
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);

    // A stopped container cannot exec.
    let mut rt = env.d.runtime().await.expect("client");
    rt.stop_container(cri::StopContainerRequest {
        container_id: ctr.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    let e = exec(&env, &ctr, &["true"], 10)
        .await
        .expect_err("exec in stopped container");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    no_process_files(&env);
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_deadline_background_child_and_output_cap() {
    let env = env().await;
    let (pod, ctr) = running(&env, "exectime", Default::default()).await;

    // The deadline: DeadlineExceeded, and the process is killed.
    let t = Instant::now();
    let e = exec(
        &env,
        &ctr,
        &["sh", "-c", "echo $$ > /tmp/victim; exec sleep 300"],
        1,
    )
    .await
    .expect_err("timeout");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let victim = exec(&env, &ctr, &["cat", "/tmp/victim"], 10)
        .await
        .expect("read pid");
    let victim = text(&victim.stdout).trim().to_owned();
    assert!(!victim.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exec(
            &env,
            &ctr,
            &["sh", "-c", &format!("test -d /proc/{victim}")],
            10,
        )
        .await
        .expect("probe");
        if r.exit_code != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed-out exec {victim} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A background child keeps stdout open: the call returns when the command exits, with what
    // it printed, not when the child ends.
    let t = Instant::now();
    let r = exec(
        &env,
        &ctr,
        &["sh", "-c", "sleep 300 & echo started; echo gone >&2"],
        60,
    )
    .await
    .expect("exec with background child");
    assert_eq!(text(&r.stdout), "started\n");
    assert_eq!(text(&r.stderr), "gone\n");
    assert_eq!(r.exit_code, 0);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Output beyond the cap is dropped; the command still runs to its end.
    let r = exec(
        &env,
        &ctr,
        &["sh", "-c", "head -c 12000000 /dev/zero; echo done >&2"],
        60,
    )
    .await
    .expect("big output");
    assert_eq!(r.stdout.len(), MAX_OUTPUT);
    assert_eq!(text(&r.stderr), "done\n");
    assert_eq!(r.exit_code, 0);

    no_process_files(&env);
    remove_pod(&env, &pod).await;
    assert_clean(&env);
}

/// The first `key:` line of `/proc/self/status` text, as a hex mask or a number.
fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_confined_like_the_container() {
    let env = env().await;
    for (name, sc) in [
        // kubelet's usual case: RuntimeDefault seccomp without no_new_privs, non-root.
        (
            "execuser",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                run_as_group: Some(cri::Int64Value { value: 3000 }),
                supplemental_groups: vec![4000],
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            },
        ),
        // Root with no_new_privs and seccomp.
        (
            "execnnp",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 0 }),
                no_new_privs: true,
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            },
        ),
        // Root without seccomp.
        (
            "execunconfined",
            cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 0 }),
                ..Default::default()
            },
        ),
    ] {
        let (pod, ctr) = running(&env, name, sc.clone()).await;
        let init = exec(&env, &ctr, &["cat", "/proc/1/status"], 10)
            .await
            .expect("init status");
        let own = exec(
            &env,
            &ctr,
            &[
                "sh",
                "-c",
                "cat /proc/self/status; id -u; id -G; cat /proc/self/cgroup",
            ],
            10,
        )
        .await
        .expect("own status");
        let (init, own) = (text(&init.stdout), text(&own.stdout));
        for key in [
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ] {
            assert_eq!(field(&own, key), field(&init, key), "{name}: {key}");
        }
        let seccomp = field(&own, "Seccomp");
        if sc.seccomp.is_some() {
            assert_eq!(seccomp, "2", "{name}: the exec'd process is filtered");
        } else {
            assert_eq!(seccomp, "0", "{name}");
        }
        let cap_sys_admin = 1u64 << 21;
        let prm = u64::from_str_radix(&field(&own, "CapPrm"), 16).expect("hex");
        assert_eq!(
            prm & cap_sys_admin,
            0,
            "{name}: CAP_SYS_ADMIN left permitted"
        );
        let lines: Vec<&str> = own.lines().collect();
        let uid_at = lines
            .iter()
            .position(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
            .expect("id -u line");
        let want_uid = sc.run_as_user.map(|u| u.value).unwrap_or(0).to_string();
        assert_eq!(lines[uid_at], want_uid, "{name}: uid");
        if name == "execuser" {
            assert_eq!(lines[uid_at + 1], "3000 4000", "{name}: groups");
        }
        assert!(
            own.lines().any(|l| l.contains(&ctr)),
            "{name}: the exec'd process is in the container's cgroup: {own}"
        );
        if sc.seccomp.is_some() {
            // docker's profile refuses unshare without CAP_SYS_ADMIN, also to exec'd processes.
            let r = exec(&env, &ctr, &["/bin/busybox", "unshare", "-U", "true"], 10)
                .await
                .expect("unshare");
            assert_ne!(r.exit_code, 0, "{name}: unshare was allowed: {r:?}");
        }
        remove_pod(&env, &pod).await;
    }
    no_process_files(&env);
    assert_clean(&env);
}
