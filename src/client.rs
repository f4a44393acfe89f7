//! client: the HTTPS client behind the CLI's client commands. Talks to any node of
//! `--endpoints` with a client certificate and moves to the next endpoint when one cannot be
//! reached. Knows nothing of the server's internals: only the public REST API.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::tls;

/// A failed client call, with one clear line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint given")]
    NoEndpoints,
    #[error("no endpoint reachable (last error: {0})")]
    Unreachable(String),
    #[error("{status}: {detail}")]
    Api {
        status: u16,
        kind: String,
        detail: String,
    },
    #[error("bad response from {endpoint}: {reason}")]
    BadResponse { endpoint: String, reason: String },
    #[error("tls setup: {0}")]
    Tls(String),
}

/// An answer from the API.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    /// `X-Cairn-Index`, if present.
    pub index: Option<u64>,
    /// `X-Cairn-Leader`, if present.
    pub leader: Option<String>,
}

pub struct Client {
    endpoints: Vec<String>,
    http: reqwest::Client,
    /// `Authorization: Bearer ...`, sent with every request when set.
    bearer: Option<reqwest::header::HeaderValue>,
}

impl Client {
    /// `endpoints` are `host:port` or `https://host:port`, any node of the cluster.
    pub fn new(
        endpoints: &[String],
        ca: &Path,
        cert: &Path,
        key: &Path,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        tls::install_crypto_provider();
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.starts_with("https://") {
                    e.trim_end_matches('/').to_string()
                } else {
                    format!("https://{e}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let http =
            tls::api_client(ca, cert, key, timeout).map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Client {
            endpoints,
            http,
            bearer: None,
        })
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_bearer_token(mut self, token: &str) -> Result<Client, ClientError> {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| {
                ClientError::Tls("the token contains characters not allowed in a header".into())
            })?;
        value.set_sensitive(true);
        self.bearer = Some(value);
        Ok(self)
    }

    /// Downloads `path` into `dest` (a temporary file next to it, fsynced, renamed), trying
    /// each endpoint in turn: a node that cannot be reached, answers 503, or cuts the
    /// download short (fewer bytes than its `Content-Length`) is retried on the next one.
    /// Returns the number of bytes and the endpoint that served them.
    pub async fn download(&self, path: &str, dest: &Path) -> Result<(u64, String), ClientError> {
        use std::io::Write as _;
        let tmp = dest.with_extension("part");
        let mut last = String::new();
        for ep in &self.endpoints {
            let mut req = self.http.get(format!("{ep}{path}"));
            if let Some(b) = &self.bearer {
                req = req.header(reqwest::header::AUTHORIZATION, b.clone());
            }
            let mut resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{ep}: {}", tls::error_chain(&e));
                    continue;
                }
            };
            let status = resp.status();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                last = format!("{ep}: 503 {}", resp.text().await.unwrap_or_default());
                continue;
            }
            if !status.is_success() {
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                return Err(ClientError::Api {
                    status: status.as_u16(),
                    kind: body["type"].as_str().unwrap_or("error").to_string(),
                    detail: body["detail"]
                        .as_str()
                        .unwrap_or(status.as_str())
                        .to_string(),
                });
            }
            let expected = resp.content_length();
            let io = |e: std::io::Error| ClientError::BadResponse {
                endpoint: dest.display().to_string(),
                reason: e.to_string(),
            };
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            let mut got = 0u64;
            let mut cut = None;
            loop {
                match resp.chunk().await {
                    Ok(Some(bytes)) => {
                        got += bytes.len() as u64;
                        file.write_all(&bytes).map_err(io)?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        cut = Some(tls::error_chain(&e));
                        break;
                    }
                }
            }
            if cut.is_some() || expected.is_some_and(|n| n != got) {
                last = format!(
                    "{ep}: download cut short after {got} of {} bytes{}",
                    expected.map_or("?".into(), |n| n.to_string()),
                    cut.map(|c| format!(": {c}")).unwrap_or_default()
                );
                let _ = std::fs::remove_file(&tmp);
                continue;
            }
            file.sync_all().map_err(io)?;
            drop(file);
            std::fs::rename(&tmp, dest).map_err(io)?;
            return Ok((got, ep.clone()));
        }
        Err(ClientError::Unreachable(last))
    }

    /// Sends `body` as an `application/octet-stream` POST to the first endpoint that can be
    /// reached.
    pub async fn upload(&self, path: &str, body: Vec<u8>) -> Result<Reply, ClientError> {
        let mut last = String::new();
        for ep in &self.endpoints {
            let mut req = self
                .http
                .post(format!("{ep}{path}"))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone());
            if let Some(b) = &self.bearer {
                req = req.header(reqwest::header::AUTHORIZATION, b.clone());
            }
            match req.send().await {
                Ok(resp) => return reply(ep, resp).await,
                Err(e) if e.is_connect() => last = format!("{ep}: {e}"),
                Err(e) => return Err(ClientError::Unreachable(format!("{ep}: {e}"))),
            }
        }
        Err(ClientError::Unreachable(last))
    }

    /// Sends one request, trying each endpoint in turn while they cannot be reached. An
    /// endpoint that answers (even with an error status) ends the search: the request may have
    /// taken effect there.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Reply, ClientError> {
        let mut last = String::new();
        for ep in &self.endpoints {
            let mut req = self.http.request(method.clone(), format!("{ep}{path}"));
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(b) = &self.bearer {
                req = req.header(reqwest::header::AUTHORIZATION, b.clone());
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    last = format!("{ep}: {e}");
                    continue;
                }
                Err(e) => return Err(ClientError::Unreachable(format!("{ep}: {e}"))),
            };
            return reply(ep, resp).await;
        }
        Err(ClientError::Unreachable(last))
    }
}

/// Reads an API answer: JSON on success, a problem document as [`ClientError::Api`] otherwise.
async fn reply(ep: &str, resp: reqwest::Response) -> Result<Reply, ClientError> {
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let index = header("x-cairn-index").and_then(|v| v.parse().ok());
    let leader = header("x-cairn-leader");
    let text = resp.text().await.map_err(|e| ClientError::BadResponse {
        endpoint: ep.to_string(),
        reason: e.to_string(),
    })?;
    let body: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).map_err(|e| ClientError::BadResponse {
            endpoint: ep.to_string(),
            reason: e.to_string(),
        })?
    };
    if !status.is_success() {
        let kind = body
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_string();
        let detail = body
            .get("detail")
            .and_then(Value::as_str)
            .unwrap_or(status.as_str())
            .to_string();
        return Err(ClientError::Api {
            status: status.as_u16(),
            kind,
            detail,
        });
    }
    Ok(Reply {
        status,
        body,
        index,
        leader,
    })
}
