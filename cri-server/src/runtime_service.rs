//! CRI RuntimeService: translates each call into calls on the core managers (sandboxes,
//! containers, pod networks). Exec, Attach and PortForward hand out URLs of the streaming
//! server. Checkpointing and the metrics calls answer UNIMPLEMENTED until they are built —
//! never a fake success.

use std::sync::Arc;

use api::cri;
use api::cri::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::container::stream::StreamOpts;
use crate::container::{ContainerManager, Observed};
use crate::error::Error;
use crate::events::{Event, EventKind, Subscription};
use crate::sandbox::{SandboxManager, SandboxRecord, State};
use crate::streaming::StreamingServer;
use crate::streaming::cache::Pending;

/// The name and version berthd reports.
pub const RUNTIME_NAME: &str = "berth";
/// CRI API version served.
pub const CRI_VERSION: &str = "v1";

/// Answers the runtime calls by translating them into calls on the core managers.
pub struct RuntimeServiceImpl {
    sandboxes: Arc<SandboxManager>,
    containers: Arc<ContainerManager>,
    streaming: Arc<StreamingServer>,
}

impl RuntimeServiceImpl {
    /// Serves the given core; streaming URLs lead to `streaming`.
    pub fn new(
        sandboxes: Arc<SandboxManager>,
        containers: Arc<ContainerManager>,
        streaming: Arc<StreamingServer>,
    ) -> Self {
        RuntimeServiceImpl {
            sandboxes,
            containers,
            streaming,
        }
    }
}

fn container_matches(o: &Observed, f: &cri::ContainerFilter) -> bool {
    let r = &o.record;
    (f.id.is_empty() || r.id.starts_with(&f.id))
        && (f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
        && f.state.as_ref().is_none_or(|s| s.state == o.state as i32)
        && f.label_selector
            .iter()
            .all(|(k, v)| r.config.labels.get(k) == Some(v))
}

fn to_container(o: &Observed) -> cri::Container {
    let r = &o.record;
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: r.config.metadata.clone(),
        image: Some(cri::ImageSpec {
            image: r.image_name.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        state: o.state as i32,
        created_at: r.created_at_ns,
        labels: r.config.labels.clone(),
        annotations: r.config.annotations.clone(),
        image_id: r.image_id.clone(),
    }
}

fn state_of(r: &SandboxRecord) -> i32 {
    match r.state {
        State::Ready => cri::PodSandboxState::SandboxReady as i32,
        _ => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn to_pod_sandbox(r: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: r.id.clone(),
        metadata: r.config.metadata.clone(),
        state: state_of(r),
        created_at: r.created_at_ns,
        labels: r.config.labels.clone(),
        annotations: r.config.annotations.clone(),
        runtime_handler: r.runtime_handler.clone(),
    }
}

fn to_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: r.config.metadata.clone(),
        state: state_of(r),
        created_at: r.created_at_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: r.ips.first().cloned().unwrap_or_default(),
            additional_ips: r
                .ips
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(r.namespace_options()),
            }),
        }),
        labels: r.config.labels.clone(),
        annotations: r.config.annotations.clone(),
        runtime_handler: r.runtime_handler.clone(),
    }
}

fn to_event(e: &Event) -> cri::ContainerEventResponse {
    let kind = match e.kind {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    cri::ContainerEventResponse {
        container_id: e.id.clone(),
        container_event_type: kind as i32,
        created_at: e.at_ns,
        pod_sandbox_status: e.sandbox.as_ref().map(to_status),
        containers_statuses: e
            .containers
            .iter()
            .map(crate::container::to_status)
            .collect(),
    }
}

/// The CRI event stream of one subscriber: ends with an error when it fell behind (events were
/// lost for it: kubelet then resubscribes and relists), and cleanly at shutdown.
fn event_stream(
    sub: Subscription,
) -> futures::stream::BoxStream<'static, Result<cri::ContainerEventResponse, Status>> {
    Box::pin(futures::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        match sub.next().await {
            Ok(Some(e)) => Some((Ok(to_event(&e)), Some(sub))),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "container events subscriber is too slow: ending its stream");
                Some((
                    Err(Status::resource_exhausted(format!(
                        "{e}: events were lost; subscribe again"
                    ))),
                    None,
                ))
            }
        }
    }))
}

fn matches(r: &SandboxRecord, f: &cri::PodSandboxFilter) -> bool {
    (f.id.is_empty() || r.id.starts_with(&f.id))
        && f.state.as_ref().is_none_or(|s| s.state == state_of(r))
        && f.label_selector
            .iter()
            .all(|(k, v)| r.config.labels.get(k) == Some(v))
}

fn unimplemented<T>(method: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{method} is not implemented by berth yet"
    )))
}

/// Methods answering UNIMPLEMENTED. Written in the form `async_trait` expands to, because
/// `async_trait` cannot see inside a macro invocation.
macro_rules! not_yet {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            _: Request<$req>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>,
        >
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(std::future::ready(unimplemented(stringify!($name))))
        }
    )*};
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_VERSION.into(),
        }))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            // Not ready keeps kubelet from scheduling pods that need a network here.
            match self.sandboxes.network().ready().await {
                Ok(()) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: true,
                    reason: String::new(),
                    message: String::new(),
                },
                Err(why) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: false,
                    reason: "NetworkPluginNotReady".into(),
                    message: format!("Network plugin returns error: {why}"),
                },
            },
        ];
        let mut info = std::collections::HashMap::new();
        if req.get_ref().verbose {
            info.insert(
                "config".into(),
                serde_json::json!({ "runtimeName": RUNTIME_NAME, "cgroupDriver": "cgroupfs" })
                    .to_string(),
            );
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![cri::RuntimeHandler {
                name: String::new(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            }],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    type GetContainerEventsStream =
        futures::stream::BoxStream<'static, Result<cri::ContainerEventResponse, Status>>;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Ok(Response::new(event_stream(
            self.containers.events().subscribe(),
        )))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a pod sandbox config"))?;
        let id = self.sandboxes.run(config, &req.runtime_handler).await?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        self.containers
            .stop_sandbox(&req.get_ref().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        self.containers
            .remove_sandbox(&req.get_ref().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        let r = self.sandboxes.get_observed(&req.pod_sandbox_id)?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let pins: std::collections::HashMap<String, String> = r
                .pins
                .iter()
                .filter_map(|p| {
                    Some((
                        p.file_name()?.to_string_lossy().into_owned(),
                        p.display().to_string(),
                    ))
                })
                .collect();
            let detail = serde_json::json!({
                "hostname": r.hostname,
                "network": r.network,
                "namespaces": pins,
                "filesDir": self.sandboxes.files_dir(&r.id),
                "config": r.config,
            });
            info.insert("info".to_owned(), detail.to_string());
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(to_status(&r)),
            info,
            containers_statuses: vec![],
            timestamp: crate::sandbox::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let items = self
            .sandboxes
            .list()?
            .iter()
            // The engine's pods belong to docker clients, as containerd's moby namespace.
            .filter(|r| !r.config.labels.contains_key(crate::engine::ENGINE_LABEL))
            .filter(|r| matches(r, &filter))
            .map(to_pod_sandbox)
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer needs a container config"))?;
        let id = self
            .containers
            .create(&req.pod_sandbox_id, config, req.sandbox_config)
            .await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.containers.start(&req.get_ref().container_id).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        let timeout = std::time::Duration::from_secs(req.timeout.max(0) as u64);
        self.containers.stop(&req.container_id, timeout).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        self.containers.remove(&req.get_ref().container_id).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let containers = self
            .containers
            .list()
            .await?
            .iter()
            .filter(|o| {
                !o.record
                    .config
                    .labels
                    .contains_key(crate::engine::ENGINE_LABEL)
            })
            .filter(|o| container_matches(o, &filter))
            .map(to_container)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        let status = self.containers.status(&req.container_id).await?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let detail = self.containers.verbose_info(&req.container_id).await?;
            info.insert("info".to_owned(), detail.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        let linux = req.linux.ok_or_else(|| {
            Status::invalid_argument("UpdateContainerResources needs linux resources")
        })?;
        self.containers
            .update_resources(&req.container_id, linux)
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.containers
            .reopen_log(&req.get_ref().container_id)
            .await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        let timeout = std::time::Duration::from_secs(u64::try_from(req.timeout).unwrap_or(0));
        let out = self
            .containers
            .exec_sync(&req.container_id, req.cmd, timeout)
            .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let stats = self
            .containers
            .container_stats(&req.get_ref().container_id)
            .await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let stats = self.containers.list_container_stats(&filter).await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let stats = self
            .containers
            .pod_sandbox_stats(&req.get_ref().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let stats = self.containers.list_pod_sandbox_stats(&filter).await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        self.sandboxes.network().set_pod_cidr(&cidr)?;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = request.into_inner();
        if req.cmd.is_empty() {
            return Err(Error::InvalidArgument("cmd is required".into()).into());
        }
        StreamOpts::of_exec(&req).validate()?;
        self.containers.running(&req.container_id).await?;
        let url = self.streaming.url(Pending::Exec(req))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = request.into_inner();
        let r = self.containers.running(&req.container_id).await?;
        StreamOpts::of_attach(&req).validate_attach(&r.config)?;
        let url = self.streaming.url(Pending::Attach(req))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = request.into_inner();
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(Error::InvalidArgument(format!("port {p} is not 1-65535")).into());
        }
        let pod = self.sandboxes.get(&req.pod_sandbox_id)?;
        if pod.state != State::Ready {
            return Err(
                Error::FailedPrecondition(format!("pod sandbox {} is not ready", pod.id)).into(),
            );
        }
        let url = self.streaming.url(Pending::PortForward(req))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    not_yet! {
        checkpoint_container(cri::CheckpointContainerRequest) -> cri::CheckpointContainerResponse;
        list_metric_descriptors(cri::ListMetricDescriptorsRequest) -> cri::ListMetricDescriptorsResponse;
        list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest) -> cri::ListPodSandboxMetricsResponse;
    }
}
