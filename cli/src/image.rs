//! `images`, `pull`, `push`, `tag`, `rmi`, `history`, `save`, `load`, `import`.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptions, ImportImageOptions, ListImagesOptions, RemoveImageOptions, TagImageOptions,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::args::{
    HistoryArgs, ImagesArgs, ImportArgs, LoadArgs, PullArgs, RmiArgs, SaveArgs, TagArgs,
};
use crate::client::{Exit, report};
use crate::format::{ago, human_size, short_id};
use crate::template::render_rows;

/// `name[:tag|@digest]` split into the repository and the tag or digest (`latest` when
/// neither is given; the bool says it was defaulted).
pub fn split_reference(r: &str) -> (String, String, bool) {
    let r = r.trim();
    if let Some((repo, digest)) = r.split_once('@') {
        return (repo.to_owned(), digest.to_owned(), false);
    }
    match r.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), tag.to_owned(), false),
        _ => (r.to_owned(), "latest".to_owned(), true),
    }
}

/// Redraws one line per layer in place on a terminal; prints plain lines otherwise.
struct Progress {
    tty: bool,
    layers: Vec<(String, String)>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: crate::tty::stdout_is_tty(),
            layers: Vec::new(),
        }
    }

    fn update(&mut self, id: Option<&str>, status: &str, progress: Option<&str>) {
        let mut out = std::io::stdout().lock();
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            let _ = writeln!(out, "{status}");
            if self.tty {
                // Lines above are history now; new layers start below.
                self.layers.clear();
            }
            return;
        };
        let line = match progress.filter(|p| !p.is_empty()) {
            Some(p) => format!("{id}: {status} {p}"),
            None => format!("{id}: {status}"),
        };
        if !self.tty {
            // Byte counts are noise in a log; docker leaves them out too.
            if progress.is_none_or(str::is_empty) {
                let _ = writeln!(out, "{line}");
            }
            return;
        }
        match self.layers.iter().position(|(i, _)| i == id) {
            Some(pos) => {
                let up = self.layers.len() - pos;
                self.layers[pos].1 = line.clone();
                let _ = write!(out, "\x1b[{up}A\r\x1b[2K{line}\x1b[{up}B\r");
            }
            None => {
                let _ = writeln!(out, "{line}");
                self.layers.push((id.to_owned(), line));
            }
        }
        let _ = out.flush();
    }
}

/// `[=====>    ]  1.2MB/4.3MB` for a layer's progress, when there is any.
fn bar(p: Option<&bollard::models::ProgressDetail>) -> Option<String> {
    let p = p?;
    let (cur, total) = (p.current?, p.total.unwrap_or(0));
    if total <= 0 {
        return Some(human_size(cur));
    }
    let filled = ((cur.min(total) as f64 / total as f64) * 50.0) as usize;
    let arrow = if filled < 50 { ">" } else { "" };
    Some(format!(
        "[{}{arrow}{}]  {}/{}",
        "=".repeat(filled),
        " ".repeat(50 - filled - arrow.len()),
        human_size(cur),
        human_size(total)
    ))
}

/// docker checks a reference before it asks the daemon; so do we, with its words.
pub fn check_reference(reference: &str) -> Result<()> {
    let (repo, _, _) = split_reference(reference);
    if repo.is_empty() || reference.contains(char::is_whitespace) {
        bail!("invalid reference format");
    }
    let first = repo.split('/').next().unwrap_or("");
    let path = match repo.split_once('/') {
        Some((_, rest)) if first.contains(['.', ':']) || first == "localhost" => rest,
        _ => repo.as_str(),
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("invalid reference format: repository name ({path}) must be lowercase");
    }
    Ok(())
}

/// Pulls `reference`, printing docker's progress lines unless `quiet`.
pub async fn pull(d: &Docker, reference: &str, quiet: bool) -> Result<()> {
    check_reference(reference)?;
    let (repo, tag, defaulted) = split_reference(reference);
    if defaulted && !quiet {
        println!("Using default tag: latest");
    }
    let opts = if tag.starts_with("sha256:") {
        CreateImageOptions {
            from_image: Some(format!("{repo}@{tag}")),
            ..Default::default()
        }
    } else {
        CreateImageOptions {
            from_image: Some(repo.clone()),
            tag: Some(tag.clone()),
            ..Default::default()
        }
    };
    let mut s = d.create_image(Some(opts), None, None);
    let mut progress = Progress::new();
    while let Some(item) = s.next().await {
        let info = item.with_context(|| format!("pull {reference}"))?;
        if let Some(e) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
            bail!(e);
        }
        if quiet {
            continue;
        }
        if let Some(status) = &info.status {
            progress.update(
                info.id.as_deref(),
                status,
                bar(info.progress_detail.as_ref()).as_deref(),
            );
        }
    }
    println!("{}", canonical(&repo, &tag));
    Ok(())
}

/// `docker.io/library/busybox:latest` for `busybox`, as docker prints after a pull.
fn canonical(repo: &str, tag: &str) -> String {
    let first = repo.split('/').next().unwrap_or("");
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        repo.to_owned()
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    let sep = if tag.starts_with("sha256:") { '@' } else { ':' };
    format!("{full}{sep}{tag}")
}

pub async fn pull_cmd(d: &Docker, a: PullArgs) -> Result<i32> {
    if a.all_tags {
        bail!("--all-tags is not supported by berth");
    }
    pull(d, &a.name, a.quiet).await?;
    Ok(0)
}

/// `berth push NAME[:TAG]` (or `-a NAME`: every tag of the repository), with docker's
/// per-layer progress.
pub async fn push(_d: &Docker, a: PullArgs) -> Result<i32> {
    check_reference(&a.name)?;
    let (repo, tag, defaulted) = split_reference(&a.name);
    if a.all_tags && !defaulted {
        bail!("tag can't be used with --all-tags/-a");
    }
    if defaulted && !a.all_tags && !a.quiet {
        println!("Using default tag: latest");
    }
    let mut lines = crate::raw::push(&repo, (!a.all_tags).then_some(tag.as_str())).await?;
    let mut progress = Progress::new();
    while let Some(item) = lines.recv().await {
        let v = item.with_context(|| format!("push {}", a.name))?;
        if let Some(e) = v["errorDetail"]["message"].as_str().or(v["error"].as_str()) {
            bail!("{e}");
        }
        if a.quiet {
            continue;
        }
        if let Some(status) = v["status"].as_str() {
            let detail = bollard::models::ProgressDetail {
                current: v["progressDetail"]["current"].as_i64(),
                total: v["progressDetail"]["total"].as_i64(),
            };
            progress.update(v["id"].as_str(), status, bar(Some(&detail)).as_deref());
        }
    }
    if a.quiet && !a.all_tags {
        println!("{}", canonical(&repo, &tag));
    } else if a.quiet {
        println!("{repo}");
    }
    Ok(0)
}

fn filters(list: &[String]) -> Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for f in list {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("bad format of filter (expected name=value): {f}"))?;
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    Ok(out)
}

/// `--filter k=v` flags into the API's map.
pub fn parse_filters(list: &[String]) -> Result<Option<HashMap<String, Vec<String>>>> {
    Ok(Some(filters(list)?).filter(|m| !m.is_empty()))
}

pub async fn images(d: &Docker, a: ImagesArgs) -> Result<i32> {
    let mut f = filters(&a.filter)?;
    if let Some(r) = &a.reference {
        f.entry("reference".into()).or_default().push(r.clone());
    }
    let list = d
        .list_images(Some(ListImagesOptions {
            all: a.all,
            filters: Some(f).filter(|m| !m.is_empty()),
            digests: a.digests,
            ..Default::default()
        }))
        .await
        .context("list images")?;
    let mut rows = Vec::new();
    let mut seen_ids = std::collections::HashSet::new();
    for i in &list {
        let id = if a.no_trunc {
            i.id.clone()
        } else {
            short_id(&i.id)
        };
        if a.quiet {
            if seen_ids.insert(id.clone()) {
                println!("{id}");
            }
            continue;
        }
        let tags: Vec<(String, String)> = if i.repo_tags.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            i.repo_tags
                .iter()
                .map(|t| {
                    let (r, t, _) = split_reference(t);
                    (r, t)
                })
                .collect()
        };
        let digest = i
            .repo_digests
            .first()
            .and_then(|d| d.split_once('@'))
            .map_or("<none>".to_owned(), |(_, d)| d.to_owned());
        for (repo, tag) in tags {
            rows.push(json!({
                "ID": id, "Repository": repo, "Tag": tag, "Digest": digest,
                "CreatedSince": ago(i.created), "CreatedAt": crate::format::created_at(i.created),
                "Size": human_size(i.size), "Containers": i.containers.to_string(),
                "SharedSize": human_size(i.shared_size.max(0)),
            }));
        }
    }
    if a.quiet {
        return Ok(0);
    }
    let header = json!({"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG",
        "Digest": "DIGEST", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE",
        "Containers": "CONTAINERS", "SharedSize": "SHARED SIZE"});
    let default = if a.digests {
        "table {{.Repository}}\t{{.Tag}}\t{{.Digest}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
    } else {
        "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
    };
    print!(
        "{}",
        render_rows(a.format.as_deref().unwrap_or(default), &header, &rows)?
    );
    Ok(0)
}

pub async fn tag(d: &Docker, a: TagArgs) -> Result<i32> {
    let (repo, tag, _) = split_reference(&a.target);
    d.tag_image(
        &a.source,
        Some(TagImageOptions {
            repo: Some(repo),
            tag: Some(tag),
        }),
    )
    .await
    .with_context(|| format!("tag {} as {}", a.source, a.target))?;
    Ok(0)
}

pub async fn rmi(d: &Docker, a: RmiArgs) -> Result<i32> {
    let mut code = 0;
    for name in &a.images {
        match d
            .remove_image(
                name,
                Some(RemoveImageOptions {
                    force: a.force,
                    noprune: a.no_prune,
                    ..Default::default()
                }),
                None,
            )
            .await
            .with_context(|| format!("remove image {name}"))
        {
            Ok(items) => {
                for i in items {
                    if let Some(u) = i.untagged {
                        println!("Untagged: {u}");
                    }
                    if let Some(d) = i.deleted {
                        println!("Deleted: {d}");
                    }
                }
            }
            Err(e) => {
                report(&e);
                code = 1;
            }
        }
    }
    if code != 0 {
        return Err(Exit(code).into());
    }
    Ok(0)
}

pub async fn history(d: &Docker, a: HistoryArgs) -> Result<i32> {
    let items = d
        .image_history(&a.image)
        .await
        .with_context(|| format!("history of {}", a.image))?;
    let rows: Vec<Value> = items
        .iter()
        .map(|h| {
            let id = if h.id == "<missing>" || a.no_trunc {
                h.id.clone()
            } else {
                short_id(&h.id)
            };
            let by = if a.no_trunc || h.created_by.chars().count() <= 45 {
                h.created_by.clone()
            } else {
                format!("{}…", h.created_by.chars().take(44).collect::<String>())
            };
            json!({"ID": id, "CreatedSince": if a.human { ago(h.created) } else { h.created.to_string() },
                "CreatedAt": crate::format::rfc3339(h.created), "CreatedBy": by,
                "Size": if a.human { human_size(h.size) } else { h.size.to_string() },
                "Comment": h.comment})
        })
        .collect();
    if a.quiet {
        for r in &rows {
            println!("{}", r["ID"].as_str().unwrap_or(""));
        }
        return Ok(0);
    }
    let header = json!({"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT",
        "CreatedBy": "CREATED BY", "Size": "SIZE", "Comment": "COMMENT"});
    let default = "table {{.ID}}\t{{.CreatedSince}}\t{{.CreatedBy}}\t{{.Size}}\t{{.Comment}}";
    print!(
        "{}",
        render_rows(a.format.as_deref().unwrap_or(default), &header, &rows)?
    );
    Ok(0)
}

pub async fn save(d: &Docker, a: SaveArgs) -> Result<i32> {
    let names: Vec<&str> = a.images.iter().map(String::as_str).collect();
    let mut out: Box<dyn Write> = match &a.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {path}"))?,
        )),
        None => {
            if crate::tty::stdout_is_tty() {
                bail!("cowardly refusing to save to a terminal. Use the -o flag or redirect");
            }
            Box::new(std::io::stdout().lock())
        }
    };
    let mut s = d.export_images(&names);
    while let Some(chunk) = s.next().await {
        let chunk = chunk.context("save images")?;
        out.write_all(&chunk).context("write the archive")?;
    }
    out.flush().context("write the archive")?;
    Ok(0)
}

/// The archive at `path` (a file, or stdin for none or `-`) as a body streamed as it is read:
/// image archives are as large as the images in them.
fn input_stream(
    path: Option<&str>,
) -> Result<(crate::body::BodyStream, tokio::task::JoinHandle<Result<()>>)> {
    match path {
        Some(p) if p != "-" => {
            let f = std::fs::File::open(p).map_err(|e| {
                let what = match e.kind() {
                    std::io::ErrorKind::NotFound => "no such file or directory".to_owned(),
                    std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
                    _ => e.to_string(),
                };
                anyhow::anyhow!("open {p}: {what}")
            })?;
            Ok(crate::body::read_stream(f))
        }
        _ => Ok(crate::body::read_stream(std::io::stdin())),
    }
}

/// The reading side's failure, if it had one: it says more than the request it broke.
async fn read_failure(reader: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    reader
        .await
        .context("the reading thread")?
        .context("read the archive")
}

pub async fn load(d: &Docker, a: LoadArgs) -> Result<i32> {
    if a.input.is_none() && crate::tty::stdin_is_tty() {
        bail!("requested load from stdin, but stdin is empty");
    }
    let (body, reader) = input_stream(a.input.as_deref())?;
    let mut s = d.import_image(
        ImportImageOptions {
            quiet: a.quiet,
            ..Default::default()
        },
        bollard::body_try_stream(body),
        None,
    );
    while let Some(item) = s.next().await {
        let info = match item {
            Ok(i) => i,
            Err(e) => {
                read_failure(reader).await?;
                return Err(anyhow::Error::new(e).context("load images"));
            }
        };
        if let Some(e) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
            bail!(e);
        }
        if let Some(line) = info.stream.as_deref() {
            print!("{line}");
        } else if let Some(status) = info.status.as_deref() {
            println!("{status}");
        }
    }
    Ok(0)
}

pub async fn import(d: &Docker, a: ImportArgs) -> Result<i32> {
    let (body, reader) = input_stream(Some(a.file.as_str()))?;
    let (repo, tag) = match &a.reference {
        Some(r) => {
            let (repo, tag, _) = split_reference(r);
            (Some(repo), Some(tag))
        }
        None => (None, None),
    };
    let mut s = d.create_image(
        Some(CreateImageOptions {
            from_src: Some("-".into()),
            repo,
            tag,
            message: a.message.clone(),
            changes: a.change.clone(),
            ..Default::default()
        }),
        Some(bollard::body_try_stream(body)),
        None,
    );
    while let Some(item) = s.next().await {
        let info = match item {
            Ok(i) => i,
            Err(e) => {
                read_failure(reader).await?;
                return Err(anyhow::Error::new(e).context("import"));
            }
        };
        if let Some(e) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
            bail!(e);
        }
        if let Some(status) = info.status.as_deref() {
            println!("{status}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon of one request: reads it (headers, then a chunked body) and answers `answer`.
    /// Yields the request's head and its body.
    async fn one_request_daemon(
        socket: &std::path::Path,
        answer: &'static str,
    ) -> tokio::task::JoinHandle<(String, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut raw = Vec::new();
            let mut buf = [0u8; 65536];
            while !raw.ends_with(b"\r\n0\r\n\r\n") {
                let n = conn.read(&mut buf).await.expect("read");
                assert_ne!(n, 0, "the request ended early");
                raw.extend_from_slice(&buf[..n]);
            }
            let split = raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a head");
            let head = String::from_utf8_lossy(&raw[..split]).into_owned();
            let mut rest = &raw[split + 4..];
            let mut body = Vec::new();
            loop {
                let eol = rest.windows(2).position(|w| w == b"\r\n").expect("size");
                let size =
                    usize::from_str_radix(std::str::from_utf8(&rest[..eol]).expect("utf-8"), 16)
                        .expect("hex");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            conn.write_all(resp.as_bytes()).await.expect("answer");
            (head, body)
        })
    }

    #[tokio::test]
    async fn load_streams_the_file_into_the_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("d.sock");
        let daemon = one_request_daemon(&socket, "{\"stream\":\"Loaded image: x:1\\n\"}\n").await;
        let archive = dir.path().join("a.tar");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&archive, &data).expect("write");
        let d = Docker::connect_with_unix(
            socket.to_str().expect("utf-8"),
            30,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("client");
        let code = load(
            &d,
            LoadArgs {
                input: Some(archive.display().to_string()),
                quiet: false,
            },
        )
        .await
        .expect("load");
        assert_eq!(code, 0);
        let (head, body) = daemon.await.expect("daemon");
        assert!(head.starts_with("POST /"), "{head}");
        assert!(head.contains("/images/load"), "{head}");
        // Sent as it was read: chunked, no length known up front.
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        assert_eq!(body, data);
    }

    #[test]
    fn references() {
        assert_eq!(
            split_reference("busybox"),
            ("busybox".into(), "latest".into(), true)
        );
        assert_eq!(
            split_reference("localhost:5000/a/b:1.2"),
            ("localhost:5000/a/b".into(), "1.2".into(), false)
        );
        assert_eq!(
            split_reference("localhost:5000/a"),
            ("localhost:5000/a".into(), "latest".into(), true)
        );
        assert_eq!(
            split_reference("a@sha256:abc"),
            ("a".into(), "sha256:abc".into(), false)
        );
        assert_eq!(
            canonical("busybox", "latest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(canonical("me/app", "1"), "docker.io/me/app:1");
        assert_eq!(canonical("127.0.0.1:5000/x", "1"), "127.0.0.1:5000/x:1");
    }

    #[test]
    fn reference_checks() {
        assert!(check_reference("busybox:1").is_ok());
        assert!(check_reference("127.0.0.1:5000/a/b:Tag").is_ok());
        assert!(check_reference("UPPER/Case").is_err());
    }

    #[test]
    fn filter_flags() {
        let f = parse_filters(&["label=a=b".into(), "status=exited".into(), "label=c".into()])
            .expect("filters")
            .expect("some");
        assert_eq!(f["label"], ["a=b", "c"]);
        assert_eq!(f["status"], ["exited"]);
        assert!(parse_filters(&["nonsense".into()]).is_err());
        assert!(parse_filters(&[]).expect("empty").is_none());
    }
}
