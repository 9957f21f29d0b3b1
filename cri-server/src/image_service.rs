//! CRI ImageService: translates requests into calls on [`ImageManager`]. No image logic here.

use std::collections::HashMap;
use std::sync::Arc;

use api::cri;
use api::cri::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::image::{ImageManager, NamedImage};

/// Answers the image calls.
pub struct ImageServiceImpl {
    images: Arc<ImageManager>,
}

impl ImageServiceImpl {
    /// Serves `images`.
    pub fn new(images: Arc<ImageManager>) -> Self {
        ImageServiceImpl { images }
    }
}

fn spec_image(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => Err(
            Error::InvalidArgument("image spec with an image reference is required".into()).into(),
        ),
    }
}

/// The CRI view of an image: `uid` when USER is numeric, `username` otherwise, as containerd.
fn to_cri(i: &NamedImage) -> cri::Image {
    let user = i.record.user.split(':').next().unwrap_or_default();
    let (uid, username) = match user.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, user.to_owned()),
    };
    cri::Image {
        id: i.record.id.to_string(),
        repo_tags: i.tags.clone(),
        repo_digests: i.digests.clone(),
        size: i.record.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: i.record.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// Runs a metadata read on a blocking thread: the store is a file on disk.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker thread failed: {e}")))??)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(1)
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req.get_ref().filter.as_ref().and_then(|f| f.image.as_ref());
        let name = filter
            .map(|s| s.image.clone())
            .filter(|s| !s.trim().is_empty());
        let images = self.images.clone();
        let images = blocking(move || match name {
            Some(name) => Ok(images.resolve(&name)?.into_iter().collect()),
            None => images.list(),
        })
        .await?;
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = spec_image(req.image.as_ref())?.to_owned();
        let images = self.images.clone();
        let resp = blocking(move || {
            // An unknown or unparsable name is absent: kubelet pulls when it sees no image.
            let Some(found) = images.resolve(&name)? else {
                return Ok(cri::ImageStatusResponse::default());
            };
            let mut info = HashMap::new();
            if req.verbose {
                let detail = serde_json::json!({
                    "chainID": found.record.chain_ids.last(),
                    "manifestDigest": found.record.manifest_digest,
                    "manifestMediaType": found.record.manifest_media_type,
                    "indexDigest": found.record.index_digest,
                    "layers": found.record.layers,
                    "imageSpec": images.config_json(&found)?,
                });
                info.insert("info".to_owned(), detail.to_string());
            }
            Ok(cri::ImageStatusResponse {
                image: Some(to_cri(&found)),
                info,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = spec_image(req.image.as_ref())?;
        let id = self.images.pull(name, req.auth.as_ref()).await?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = spec_image(req.get_ref().image.as_ref())?;
        self.images.remove(name).await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let images = self.images.clone();
        let (usage, dir) = tokio::task::spawn_blocking(move || images.fs_usage())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let fs = cri::FilesystemUsage {
            timestamp: now_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: dir.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: usage.size }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes,
            }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![fs],
        }))
    }
}
