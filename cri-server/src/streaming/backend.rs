//! The streaming server's [`Backend`] on berthd's core.

use std::sync::Arc;

use api::cri;
use async_trait::async_trait;
use tokio::net::TcpStream;

use super::{Backend, StdStreams};
use crate::container::ContainerManager;
use crate::error::{Error, Result};
use crate::sandbox::SandboxManager;

/// Exec and attach through the containers' shims, port forwarding into pod namespaces.
pub struct CoreBackend {
    /// The pods.
    pub sandboxes: Arc<SandboxManager>,
    /// The containers.
    pub containers: Arc<ContainerManager>,
}

#[async_trait]
impl Backend for CoreBackend {
    async fn exec(&self, _req: &cri::ExecRequest, _io: StdStreams) -> Result<i32> {
        Err(Error::Unimplemented("streaming exec"))
    }

    async fn attach(&self, _req: &cri::AttachRequest, _io: StdStreams) -> Result<()> {
        Err(Error::Unimplemented("attach"))
    }

    async fn dial(&self, pod_sandbox_id: &str, port: u16) -> Result<TcpStream> {
        self.sandboxes.dial(pod_sandbox_id, port).await
    }
}
