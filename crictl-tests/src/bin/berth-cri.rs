//! `berth-cri`: a small crictl-like client for berthd's image calls, plus a test-image pusher.
//! Used by `scripts/demo` and handy by hand; crictl itself works against berthd as well.

use std::path::PathBuf;

use anyhow::Context;
use api::cri;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "berth-cri", about = "Talk CRI to berthd")]
struct Cli {
    /// CRI endpoint.
    #[arg(long, default_value = "unix:///run/berth/berth.sock")]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runtime name and version.
    Version,
    /// Runtime conditions (Status).
    Info,
    /// Pull an image.
    Pull {
        image: String,
        /// `user:password` for the registry.
        #[arg(long)]
        creds: Option<String>,
    },
    /// List images.
    Images,
    /// Image status with verbose info, as JSON.
    Inspecti { image: String },
    /// Remove an image.
    Rmi { image: String },
    /// Image filesystem usage.
    Imagefsinfo,
    /// Run a command in a new pod and container, print its output, remove both; exits with the
    /// container's exit code.
    Run {
        image: String,
        /// The command and its arguments (default: the image's entrypoint and cmd).
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Build berth's busybox test image from host binaries and push it to a registry.
    PushTestImage {
        /// `host:port` of a plain-HTTP registry.
        #[arg(long)]
        registry: String,
        #[arg(long, default_value = "busybox")]
        repo: String,
        #[arg(long, default_value = "latest")]
        tag: String,
    },
}

fn socket(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::PushTestImage {
        registry,
        repo,
        tag,
    } = &cli.cmd
    {
        let img = crictl_tests::image::busybox_image()?
            .build(crictl_tests::image::ManifestFormat::Oci)?;
        crictl_tests::image::push_image(registry, repo, tag, &img).await?;
        println!("{registry}/{repo}:{tag} {}", img.manifest_digest);
        return Ok(());
    }
    let channel = crictl_tests::daemon::connect(&socket(&cli.endpoint)).await?;
    let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel.clone());
    let mut im = cri::image_service_client::ImageServiceClient::new(channel);
    match cli.cmd {
        Cmd::Version => {
            let v = rt
                .version(cri::VersionRequest::default())
                .await?
                .into_inner();
            println!("RuntimeName:       {}", v.runtime_name);
            println!("RuntimeVersion:    {}", v.runtime_version);
            println!("RuntimeApiVersion: {}", v.runtime_api_version);
        }
        Cmd::Info => {
            let s = rt
                .status(cri::StatusRequest { verbose: true })
                .await?
                .into_inner();
            for c in s.status.map(|s| s.conditions).unwrap_or_default() {
                println!(
                    "{:<14} {:<5} {} {}",
                    c.r#type, c.status, c.reason, c.message
                );
            }
        }
        Cmd::Pull { image, creds } => {
            let auth = creds
                .map(|c| {
                    let (u, p) = c.split_once(':').context("--creds takes user:password")?;
                    anyhow::Ok(cri::AuthConfig {
                        username: u.into(),
                        password: p.into(),
                        ..Default::default()
                    })
                })
                .transpose()?;
            let r = im
                .pull_image(cri::PullImageRequest {
                    image: spec(&image),
                    auth,
                    sandbox_config: None,
                })
                .await?;
            println!("Image is up to date for {}", r.into_inner().image_ref);
        }
        Cmd::Images => {
            let list = im
                .list_images(cri::ListImagesRequest::default())
                .await?
                .into_inner()
                .images;
            println!(
                "{:<50} {:<10} {:<15} {:>10}",
                "IMAGE", "TAG", "IMAGE ID", "SIZE"
            );
            for i in list {
                let id =
                    i.id.trim_start_matches("sha256:")
                        .chars()
                        .take(13)
                        .collect::<String>();
                let size = format!("{:.1}MB", i.size as f64 / 1e6);
                let names: Vec<(String, String)> = if i.repo_tags.is_empty() {
                    i.repo_digests
                        .iter()
                        .map(|d| {
                            (
                                d.split('@').next().unwrap_or(d).to_owned(),
                                "<none>".to_owned(),
                            )
                        })
                        .collect()
                } else {
                    i.repo_tags
                        .iter()
                        .map(|t| match t.rsplit_once(':') {
                            Some((n, tag)) if !tag.contains('/') => (n.to_owned(), tag.to_owned()),
                            _ => (t.clone(), "<none>".to_owned()),
                        })
                        .collect()
                };
                for (name, tag) in names {
                    println!("{name:<50} {tag:<10} {id:<15} {size:>10}");
                }
            }
        }
        Cmd::Inspecti { image } => {
            let s = im
                .image_status(cri::ImageStatusRequest {
                    image: spec(&image),
                    verbose: true,
                })
                .await?;
            let s = s.into_inner();
            let Some(img) = s.image else {
                anyhow::bail!("no such image {image:?} present")
            };
            let info: serde_json::Value = s
                .info
                .get("info")
                .map(|i| serde_json::from_str(i))
                .transpose()?
                .unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "status": img, "info": info }))?
            );
        }
        Cmd::Rmi { image } => {
            im.remove_image(cri::RemoveImageRequest {
                image: spec(&image),
            })
            .await?;
            println!("Deleted: {image}");
        }
        Cmd::Imagefsinfo => {
            let r = im
                .image_fs_info(cri::ImageFsInfoRequest {})
                .await?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Run { image, command } => {
            let code = run(&mut rt, &image, command).await?;
            std::io::Write::flush(&mut std::io::stdout())?;
            std::process::exit(code);
        }
        Cmd::PushTestImage { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// runp → create → start → wait → print log → remove pod.
async fn run(
    rt: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    image: &str,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let logs = tempfile::tempdir()?;
    let name = format!("berth-cri-run-{}", std::process::id());
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: name.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "berth".into(),
        log_directory: logs.path().display().to_string(),
        ..Default::default()
    };
    let pod_id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("run pod sandbox")?
        .into_inner()
        .pod_sandbox_id;
    let result = async {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "run".into(),
                attempt: 0,
            }),
            image: spec(image),
            command,
            log_path: "run.log".into(),
            ..Default::default()
        };
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod),
            })
            .await
            .context("create container")?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .context("start container")?;
        let status = loop {
            let s = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("no status")?;
            if s.state == cri::ContainerState::ContainerExited as i32 {
                break s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        // CRI log records: `<time> <stream> <P|F> <text>`; print the text as the process wrote it.
        let log = std::fs::read_to_string(&status.log_path).unwrap_or_default();
        for line in log.lines() {
            let mut parts = line.splitn(4, ' ');
            let (_, stream, tag, text) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next().unwrap_or(""),
            );
            let end = if tag == Some("F") { "\n" } else { "" };
            if stream == Some("stderr") {
                eprint!("{text}{end}");
            } else {
                print!("{text}{end}");
            }
        }
        anyhow::Ok(status.exit_code)
    }
    .await;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id,
    })
    .await
    .context("remove pod sandbox")?;
    result
}
