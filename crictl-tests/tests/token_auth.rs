//! PullImage against a real `docker-registry` with bearer-token auth: the registry answers `401`
//! with `WWW-Authenticate: Bearer realm=...`, berthd (through oci-client) fetches a JWT from the
//! harness token server with the CRI credentials, and retries with `Authorization: Bearer`.

use api::cri;
use crictl_tests::daemon::{Daemon, require_root};
use crictl_tests::image::{ManifestFormat, busybox_image};
use crictl_tests::registry::Registry;
use crictl_tests::token::{TokenServer, TokenServerConfig};
use tonic::Code;

const USER: &str = "berth";
const PASSWORD: &str = "t0ken-s3cret";
const REPO: &str = "private/busybox";

async fn pull_auth(
    d: &Daemon,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    d.pull_image(image, auth).await
}

async fn remove(d: &Daemon, image: &str) {
    d.remove_image(image).await.expect("remove image");
}

fn user_pass(user: &str, password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    }
}

/// The value of `key=` in a logrus text-format line (unquoted, or quoted without escapes).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split(' ').next(),
    }
}

/// How many `GET <uri>` requests from berthd the registry let through its token check
/// (`msg="authorized request"`, only logged after the bearer token verified) and answered with
/// `200`.
fn authorized_gets(log: &str, uri: &str) -> usize {
    let authorized: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("msg=\"authorized request\""))
        .filter(|l| log_field(l, "http.request.method") == Some("GET"))
        .filter(|l| log_field(l, "http.request.uri") == Some(uri))
        .filter(|l| log_field(l, "http.request.useragent").is_some_and(|a| a.starts_with("berth/")))
        .filter_map(|l| log_field(l, "http.request.id"))
        .collect();
    log.lines()
        .filter(|l| l.contains("msg=\"response completed\""))
        .filter(|l| log_field(l, "http.response.status") == Some("200"))
        .filter_map(|l| log_field(l, "http.request.id"))
        .filter(|id| authorized.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_through_bearer_token_flow() {
    require_root();
    let img = busybox_image()
        .expect("image")
        .build(ManifestFormat::Oci)
        .expect("build");
    let tokens = TokenServer::start(TokenServerConfig::new(USER, PASSWORD))
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

    // The registry challenges anonymous clients with the token server's realm.
    let resp = reg
        .client()
        .expect("client")
        .request(reqwest::Method::GET, "/v2/")
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains(&format!("realm=\"{}\"", tokens.realm()))
            && challenge.contains(&format!("service=\"{}\"", tokens.service())),
        "challenge: {challenge}"
    );

    // Push through the same flow: a pull,push token from the token server, sent as Bearer.
    let push_token = tokens
        .fetch_token(
            Some((USER, PASSWORD)),
            &format!("repository:{REPO}:pull,push"),
        )
        .await
        .expect("push token");
    reg.client()
        .expect("client")
        .with_bearer_token(&push_token)
        .push_image(REPO, "latest", &img)
        .await
        .unwrap_or_else(|e| panic!("push: {e:#}\nregistry log:\n{}", reg.log_tail(40)));
    assert_eq!(tokens.issued(), 1);

    let d = Daemon::start().await.expect("daemon");
    let name = reg.image_ref(REPO, "latest");

    // Anonymous: the token server refuses, berthd reports Unauthenticated.
    let refused = tokens.refused();
    let err = pull_auth(&d, &name, None).await.expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated, "anonymous: {err:?}");
    assert!(tokens.refused() > refused, "token server not asked");
    assert_eq!(tokens.issued(), 1);

    // Wrong password: refused the same way.
    let refused = tokens.refused();
    let err = pull_auth(&d, &name, Some(user_pass(USER, "wrong")))
        .await
        .expect_err("wrong password");
    assert_eq!(err.code(), Code::Unauthenticated, "wrong password: {err:?}");
    assert!(tokens.refused() > refused, "token server not asked");
    assert_eq!(tokens.issued(), 1);

    // Right credentials: a token is issued and the pull succeeds.
    let image_id = pull_auth(&d, &name, Some(user_pass(USER, PASSWORD)))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "user/pass pull: {e:?}\nregistry log:\n{}\nberthd log:\n{}",
                reg.log_tail(40),
                d.log()
            )
        });
    assert_eq!(image_id, img.config_digest);
    assert!(tokens.issued() >= 2, "no token issued to berthd");
    remove(&d, &name).await;

    // Credentials do not outlive their PullImage: anonymous is refused again.
    let err = pull_auth(&d, &name, None)
        .await
        .expect_err("anonymous after an authorised pull");
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "anonymous again: {err:?}"
    );

    // A token fetched beforehand, passed as registry_token: berthd sends it as is, without
    // asking the token server.
    let pull_token = tokens
        .fetch_token(Some((USER, PASSWORD)), &format!("repository:{REPO}:pull"))
        .await
        .expect("pull token");
    let issued = tokens.issued();
    let requests = tokens.requests();
    let auth = cri::AuthConfig {
        registry_token: pull_token,
        ..Default::default()
    };
    let image_id = pull_auth(&d, &name, Some(auth)).await.unwrap_or_else(|e| {
        panic!(
            "registry_token pull: {e:?}\nregistry log:\n{}",
            reg.log_tail(40)
        )
    });
    assert_eq!(image_id, img.config_digest);
    assert_eq!(tokens.issued(), issued, "berthd fetched a token anyway");
    assert_eq!(tokens.requests(), requests, "berthd asked the token server");
    remove(&d, &name).await;

    // A token signed by a key the registry does not trust is rejected by the registry.
    let rogue = TokenServer::start(TokenServerConfig::new(USER, PASSWORD))
        .await
        .expect("rogue token server");
    let rogue_token = rogue
        .fetch_token(Some((USER, PASSWORD)), &format!("repository:{REPO}:pull"))
        .await
        .expect("rogue token");
    let auth = cri::AuthConfig {
        registry_token: rogue_token,
        ..Default::default()
    };
    let err = pull_auth(&d, &name, Some(auth))
        .await
        .expect_err("untrusted token");
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "untrusted token: {err:?}"
    );

    // The registry log shows the bearer-authorised requests it served.
    let log = std::fs::read_to_string(reg.log_path()).expect("registry log");
    let manifest = format!("/v2/{REPO}/manifests/latest");
    assert!(
        authorized_gets(&log, &manifest) >= 2,
        "expected >= 2 bearer-authorised GET {manifest} answered 200; log:\n{log}"
    );
    for layer in &img.layers {
        let blob = format!("/v2/{REPO}/blobs/{}", layer.digest);
        assert!(
            authorized_gets(&log, &blob) >= 1,
            "expected a bearer-authorised GET {blob} answered 200; log:\n{log}"
        );
    }
    assert!(
        log.contains("error authorizing context: authorization token required"),
        "anonymous requests were not challenged; log:\n{log}"
    );
    assert!(
        log.contains("unable to verify certificate chain"),
        "rogue token not rejected for its signature; log:\n{log}"
    );

    let berthd_log = d.log();
    assert!(
        !berthd_log.contains("panicked"),
        "berthd panicked:\n{berthd_log}"
    );
}
