//! http: the one HTTP stack both targets share, so a comparison measures the servers and not
//! the clients. A rustls client config (ring provider, CA roots, client certificate for
//! mTLS) is built once from PEM files; [`HttpPool`] holds a fixed number of persistent
//! reqwest clients made from it and hands logical client `i` the pair
//! (`pool[i % C]`, `endpoint[i % E]`). [`OpError`] classifies what went wrong with one op.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long an idle pooled connection is kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Installs rustls' ring crypto provider for the process (a no-op if one is installed).
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM files of a client identity.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A rustls client config trusting the CA(s) in `files.ca` and presenting the certificate
/// chain and key in `files.cert` / `files.key`. ALPN offers h2 and http/1.1, or only
/// http/1.1 with `http1_only`.
pub fn client_tls_config(
    files: TlsFiles<'_>,
    http1_only: bool,
) -> anyhow::Result<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(files.ca, "CA")? {
        roots
            .add(ca)
            .with_context(|| format!("{}: not a usable CA certificate", files.ca.display()))?;
    }
    let chain = read_certs(files.cert, "client")?;
    let key = PrivateKeyDer::from_pem_file(files.key)
        .map_err(|e| anyhow::anyhow!("{}: no private key read: {e}", files.key.display()))?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| {
            format!(
                "{} and {} are not a matching certificate and key",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = if http1_only {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Every certificate in a PEM file; an error if it holds none.
fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read {what} certificates from {}: {e}",
                path.display()
            )
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no {what} certificate in the file", path.display());
    }
    Ok(certs)
}

/// A fixed pool of persistent HTTP clients and the endpoints they spread requests over.
#[derive(Debug, Clone)]
pub struct HttpPool {
    clients: Arc<[reqwest::Client]>,
    endpoints: Arc<[String]>,
}

impl HttpPool {
    /// `connections` clients over `tls` (`None`: plain HTTP, for tests), each with the given
    /// per-request timeout. Endpoints lose any trailing `/`.
    pub fn new(
        endpoints: &[String],
        tls: Option<rustls::ClientConfig>,
        connections: usize,
        timeout: Duration,
    ) -> anyhow::Result<HttpPool> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("no endpoint given");
        }
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let clients = (0..connections)
            .map(|_| build_client(tls.clone(), timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(HttpPool {
            clients: clients.into(),
            endpoints: endpoints.into(),
        })
    }

    /// The client and endpoint base URL of logical client `i`.
    pub fn conn(&self, i: usize) -> (&reqwest::Client, &str) {
        (
            &self.clients[i % self.clients.len()],
            &self.endpoints[i % self.endpoints.len()],
        )
    }

    /// Sends one `GET /` to every endpoint (any status will do) and returns the HTTP
    /// version each answered with; an endpoint that cannot be reached is an error naming it
    /// and the cause (refused connection, certificate rejected, ...).
    pub async fn probe(&self) -> anyhow::Result<Vec<(String, reqwest::Version)>> {
        let mut versions = Vec::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let (http, _) = self.conn(i);
            let resp = http
                .get(format!("{ep}/"))
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach {ep}: {}", error_chain(&e)))?;
            versions.push((ep.clone(), resp.version()));
        }
        Ok(versions)
    }

    /// Number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Number of pooled clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }
}

/// An error and its causes on one line: reqwest's own message rarely names the real cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn build_client(
    tls: Option<rustls::ClientConfig>,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    // reqwest's rustls backend needs a process-wide provider even for plain-HTTP clients.
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(config) = tls {
        // The non-deprecated name of `use_preconfigured_tls`.
        b = b.tls_backend_preconfigured(config).https_only(true);
    }
    b.build().context("cannot build the HTTP client")
}

/// Why one op failed; [`OpError::kind`] is the key errors are counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// A non-2xx answer.
    Status(u16),
    /// The request or the response body timed out.
    Timeout,
    /// No connection could be made.
    Connect,
    /// Any other transport failure (reset, TLS, protocol).
    Transport,
    /// A 2xx answer whose body was not what the op expects.
    BadBody,
    /// A read found no record where one was preloaded.
    NotFound,
    /// A query returned another number of records than the group holds.
    WrongCount,
}

impl OpError {
    /// The counting key: `status-5xx`, `timeout`, `connect`, ...
    pub fn kind(&self) -> String {
        match self {
            OpError::Status(s) => format!("status-{}xx", s / 100),
            OpError::Timeout => "timeout".into(),
            OpError::Connect => "connect".into(),
            OpError::Transport => "transport".into(),
            OpError::BadBody => "bad-body".into(),
            OpError::NotFound => "not-found".into(),
            OpError::WrongCount => "wrong-count".into(),
        }
    }
}

impl From<reqwest::Error> for OpError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            OpError::Timeout
        } else if e.is_connect() {
            OpError::Connect
        } else if e.is_decode() {
            OpError::BadBody
        } else {
            OpError::Transport
        }
    }
}

/// Sends `req`, fails on a non-2xx status, and returns the whole body (read to the end so
/// the connection goes back to the pool).
pub async fn send(req: reqwest::RequestBuilder) -> Result<impl AsRef<[u8]> + Send, OpError> {
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        // Drain the problem body so the connection can be reused; its content is not needed.
        let _ = resp.bytes().await;
        return Err(OpError::Status(status.as_u16()));
    }
    Ok(resp.bytes().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"))
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (ca, cert, key) = files_in(&dir);
        let files = TlsFiles {
            ca: &ca,
            cert: &cert,
            key: &key,
        };
        let missing = client_tls_config(files, false).expect_err("no files");
        assert!(missing.to_string().contains("ca.pem"), "{missing:#}");
        std::fs::write(&ca, "not a certificate\n").expect("write");
        let empty = client_tls_config(files, false).expect_err("no certificate");
        assert!(empty.to_string().contains("no CA certificate"), "{empty:#}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn pool_spreads_clients_over_endpoints_and_connections() {
        let eps: Vec<String> = ["http://a:1/", "http://b:1", "http://c:1"]
            .map(String::from)
            .to_vec();
        let pool = HttpPool::new(&eps, None, 2, Duration::from_secs(1)).expect("pool");
        assert_eq!(pool.conn(0).1, "http://a:1");
        assert_eq!(pool.conn(4).1, "http://b:1");
        assert!(std::ptr::eq(pool.conn(0).0, pool.conn(2).0));
        assert!(!std::ptr::eq(pool.conn(0).0, pool.conn(1).0));
        assert!(HttpPool::new(&[], None, 2, Duration::from_secs(1)).is_err());
        assert!(HttpPool::new(&eps, None, 0, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn status_classes() {
        assert_eq!(OpError::Status(503).kind(), "status-5xx");
        assert_eq!(OpError::Status(404).kind(), "status-4xx");
        assert_eq!(OpError::Timeout.kind(), "timeout");
    }
}
