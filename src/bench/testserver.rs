//! testserver: a tiny HTTP/1.1 server for the driver's tests. It answers every request
//! `200 {"instances":[]}` on kept-alive connections, and simulates a stalled server: when
//! its `stall_at`-th request arrives, every request in progress or arriving during the
//! next `stall` waits until the stall is over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const BODY: &str = r#"{"instances":[]}"#;

struct State {
    requests: AtomicU64,
    stall_at: u64,
    stall: Duration,
    stall_until: Mutex<Option<Instant>>,
}

impl State {
    /// Counts a request and returns when it may be answered.
    fn admit(&self) -> Option<Instant> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut until = self.stall_until.lock().ok()?;
        if n == self.stall_at {
            *until = Some(Instant::now() + self.stall);
        }
        (*until).filter(|u| *u > Instant::now())
    }
}

/// A running test server; it stops with the test's runtime.
pub struct StallServer {
    addr: std::net::SocketAddr,
    state: Arc<State>,
}

impl StallServer {
    /// Serves on 127.0.0.1 on a free port.
    pub async fn start(stall_at: u64, stall: Duration) -> std::io::Result<StallServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            requests: AtomicU64::new(0),
            stall_at,
            stall,
            stall_until: Mutex::new(None),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        Ok(StallServer { addr, state })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// True once the stall has been triggered.
    pub fn stalled(&self) -> bool {
        self.state
            .stall_until
            .lock()
            .map(|u| u.is_some())
            .unwrap_or(false)
    }
}

async fn serve(sock: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let mut conn = BufReader::new(sock);
    while let Some(body_len) = read_head(&mut conn).await? {
        let mut body = vec![0; body_len];
        conn.read_exact(&mut body).await?;
        if let Some(until) = state.admit() {
            tokio::time::sleep_until(until).await;
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        conn.get_mut().write_all(resp.as_bytes()).await?;
    }
    Ok(())
}

/// Reads a request head; returns its Content-Length, or `None` at end of stream.
async fn read_head(conn: &mut BufReader<TcpStream>) -> std::io::Result<Option<usize>> {
    let mut len = 0;
    let mut first = true;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() && !first {
            return Ok(Some(len));
        }
        first = false;
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
}
