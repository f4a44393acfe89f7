//! A userspace TCP proxy on every peer link, for delay and loss faults (the kernel here has
//! no netem). Node i advertises [`NodeInfo::proxy`] as its raft address, so its
//! peers dial the proxy, which forwards to the node's real raft port. The upstream leg binds
//! the dialing peer's own address, so the firewall's address rules (partitions) still see
//! who talks to whom on both legs.
//!
//! Each direction of a link (from, to) has its own [`LinkFault`], looked up for every chunk,
//! so open connections feel a change at once: every chunk is held for `delay` plus up to
//! `jitter`; with probability `loss` a chunk counts as lost and arrives only after a
//! retransmission timeout that doubles with each consecutive loss — what a lost segment
//! costs a TCP stream (TCP never drops bytes; it stalls them). Chunks keep their order.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::NodeInfo;

/// The first retransmission timeout of a lost chunk (Linux's minimum RTO).
const RTO: Duration = Duration::from_millis(200);
/// Consecutive losses double the timeout up to this.
const MAX_RTO: Duration = Duration::from_secs(3);
/// Bytes read at a time.
const CHUNK: usize = 16 * 1024;
/// Bound on connecting to the node behind a proxy.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a heal, what is already queued may still arrive this much later.
pub const MAX_QUEUED: Duration = Duration::from_millis(800 + 200 + 3000);

/// The fault on one direction of one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkFault {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Percent of chunks lost (and retransmitted after a timeout).
    pub loss_pct: u32,
}

impl LinkFault {
    fn is_clear(&self) -> bool {
        self.delay_ms == 0 && self.jitter_ms == 0 && self.loss_pct == 0
    }
}

/// What went through the proxies so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    pub connections: u64,
    pub chunks: u64,
    /// Chunks held by a delay or jitter.
    pub delayed: u64,
    /// Chunks "lost" (held for a retransmission timeout).
    pub lost: u64,
}

#[derive(Default)]
struct Links {
    faults: RwLock<HashMap<(u64, u64), LinkFault>>,
    connections: AtomicU64,
    chunks: AtomicU64,
    delayed: AtomicU64,
    lost: AtomicU64,
}

impl Links {
    fn fault(&self, from: u64, to: u64) -> LinkFault {
        let faults = self.faults.read().unwrap_or_else(|p| p.into_inner());
        faults.get(&(from, to)).copied().unwrap_or_default()
    }
}

/// The proxies of every node; dropping it stops them and every connection through them.
pub struct Proxy {
    links: Arc<Links>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

/// Node id of a loopback address 127.0.0.(10+id); 0 for anything else.
fn node_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] > 10 => {
            u64::from(v4.octets()[3] - 10)
        }
        _ => 0,
    }
}

impl Proxy {
    /// Binds a proxy in front of every node's raft port.
    pub async fn start(nodes: &[NodeInfo]) -> io::Result<Proxy> {
        let links = Arc::new(Links::default());
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        for n in nodes {
            let listener = TcpListener::bind(n.proxy())
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("proxy on {}: {e}", n.proxy())))?;
            tasks.push(tokio::spawn(accept_loop(
                listener,
                n.id,
                n.raft(),
                links.clone(),
                stop.clone(),
            )));
        }
        Ok(Proxy {
            links,
            tasks,
            shutdown,
        })
    }

    /// Sets the fault of the direction `from` → `to`.
    pub fn set(&self, from: u64, to: u64, fault: LinkFault) {
        let mut faults = self.links.faults.write().unwrap_or_else(|p| p.into_inner());
        if fault.is_clear() {
            faults.remove(&(from, to));
        } else {
            faults.insert((from, to), fault);
        }
    }

    /// Clears every link's fault.
    pub fn heal(&self) {
        self.links
            .faults
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn stats(&self) -> ProxyStats {
        let l = &self.links;
        ProxyStats {
            connections: l.connections.load(Ordering::Relaxed),
            chunks: l.chunks.load(Ordering::Relaxed),
            delayed: l.delayed.load(Ordering::Relaxed),
            lost: l.lost.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    to: u64,
    upstream: SocketAddr,
    links: Arc<Links>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let Ok((downstream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (links, mut stop) = (links.clone(), stop.clone());
        tokio::spawn(async move {
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, connect_as(peer.ip(), upstream));
            // No upstream: dropping the accepted stream refuses the dialer, as the node would.
            if let Ok(Ok(up)) = connect.await {
                links.connections.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    () = splice(downstream, up, node_of(peer.ip()), to, links) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        });
    }
}

/// Connects to `upstream` from `ip` (the dialing peer's own address).
async fn connect_as(ip: IpAddr, upstream: SocketAddr) -> io::Result<TcpStream> {
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    let stream = socket.connect(upstream).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Pumps both directions until either side closes.
/// Pumps both directions until both have ended. A direction that ends in an error (a reset)
/// tears the other down too; a clean end (FIN) is passed on and the other keeps going.
async fn splice(down: TcpStream, up: TcpStream, from: u64, to: u64, links: Arc<Links>) {
    let _ = down.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    let mut a = tokio::spawn(pump(down_r, up_w, from, to, links.clone()));
    let mut b = tokio::spawn(pump(up_r, down_w, to, from, links));
    let (first, other) = tokio::select! {
        r = &mut a => (r, b),
        r = &mut b => (r, a),
    };
    match first {
        Ok(Ok(())) => {
            let _ = other.await;
        }
        _ => other.abort(),
    }
}

/// One direction: a reader that stamps every chunk with its delivery time and a writer that
/// delivers in order at those times. Ok when the stream ended cleanly (and the FIN was passed
/// on), Err on a reset or a failed write.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    from: u64,
    to: u64,
    links: Arc<Links>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let mut writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            w.write_all(&bytes).await?;
        }
        w.shutdown().await
    });
    let mut last = Instant::now();
    let mut consecutive_losses = 0u32;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            read = r.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // A reset is not a clean end: the other side must not see a FIN.
                    writer.abort();
                    return Err(e);
                }
            },
            // The writer failed (the other side is gone): stop reading.
            done = &mut writer => return done.unwrap_or_else(|e| Err(io::Error::other(e))),
        };
        let fault = links.fault(from, to);
        let (hold, lost) = {
            let mut rng = rand::rng();
            schedule(&fault, &mut consecutive_losses, &mut rng)
        };
        links.chunks.fetch_add(1, Ordering::Relaxed);
        if hold > Duration::ZERO {
            links.delayed.fetch_add(1, Ordering::Relaxed);
        }
        if lost {
            links.lost.fetch_add(1, Ordering::Relaxed);
        }
        last = last.max(Instant::now() + hold);
        if tx.send((last, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    writer.await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// How long a chunk is held under `fault`, and whether it counts as lost.
fn schedule(
    fault: &LinkFault,
    consecutive_losses: &mut u32,
    rng: &mut impl Rng,
) -> (Duration, bool) {
    let mut hold = Duration::from_millis(fault.delay_ms);
    if fault.jitter_ms > 0 {
        hold += Duration::from_millis(rng.random_range(0..=fault.jitter_ms));
    }
    let lost = fault.loss_pct > 0 && rng.random_range(0..100) < fault.loss_pct;
    if lost {
        let rto = RTO
            .saturating_mul(1 << (*consecutive_losses).min(4))
            .min(MAX_RTO);
        *consecutive_losses += 1;
        hold += rto;
    } else {
        *consecutive_losses = 0;
    }
    (hold, lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::net::Ipv4Addr;

    #[test]
    fn node_ids_come_from_the_loopback_address() {
        assert_eq!(node_of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11))), 1);
        assert_eq!(node_of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 15))), 5);
        assert_eq!(node_of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))), 0);
        assert_eq!(node_of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11))), 0);
    }

    #[test]
    fn losses_back_off_like_retransmissions_and_reset() {
        let mut rng = StdRng::seed_from_u64(7);
        let all_lost = LinkFault {
            loss_pct: 100,
            ..LinkFault::default()
        };
        let mut c = 0;
        let holds: Vec<u64> = (0..7)
            .map(|_| schedule(&all_lost, &mut c, &mut rng).0.as_millis() as u64)
            .collect();
        assert_eq!(holds, [200, 400, 800, 1600, 3000, 3000, 3000]);
        let clear = LinkFault::default();
        assert_eq!(schedule(&clear, &mut c, &mut rng), (Duration::ZERO, false));
        assert_eq!(c, 0);
        assert_eq!(schedule(&all_lost, &mut c, &mut rng).0, RTO);
    }

    #[test]
    fn delay_and_jitter_bound_the_hold() {
        let mut rng = StdRng::seed_from_u64(1);
        let f = LinkFault {
            delay_ms: 50,
            jitter_ms: 20,
            loss_pct: 0,
        };
        let mut c = 0;
        for _ in 0..1000 {
            let (hold, lost) = schedule(&f, &mut c, &mut rng);
            assert!(!lost);
            assert!((50..=70).contains(&(hold.as_millis() as u64)), "{hold:?}");
        }
    }

    #[test]
    fn loss_rate_is_roughly_the_probability() {
        let mut rng = StdRng::seed_from_u64(3);
        let f = LinkFault {
            loss_pct: 20,
            ..LinkFault::default()
        };
        let mut c = 0;
        let lost = (0..10_000)
            .filter(|_| schedule(&f, &mut c, &mut rng).1)
            .count();
        assert!((1700..2300).contains(&lost), "{lost}");
    }

    /// A real round trip through the proxy: bytes arrive intact and in order, a delay on one
    /// direction shows in the round trip, and the upstream sees the dialer's own address.
    #[tokio::test]
    async fn forwards_in_order_with_the_delay_and_the_dialer_s_address() {
        let node = NodeInfo {
            id: 1,
            ip: Ipv4Addr::new(127, 0, 0, 41),
            zone: "zone-a".into(),
        };
        // Stand-in for node 1's raft port: an echo server reporting the peer's address.
        let Ok(server) = TcpListener::bind(node.raft()).await else {
            return eprintln!("skipped: {} is busy", node.raft());
        };
        let echo = tokio::spawn(async move {
            let (mut s, peer) = server.accept().await.unwrap();
            s.write_all(peer.ip().to_string().as_bytes()).await.unwrap();
            s.write_all(b"\n").await.unwrap();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = match Proxy::start(std::slice::from_ref(&node)).await {
            Ok(p) => p,
            Err(e) => return eprintln!("skipped: {e}"),
        };
        // The dialer is "node 2" (127.0.0.12 is a loopback address too).
        let client = connect_as(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 12)), node.proxy())
            .await
            .unwrap();
        let (mut r, mut w) = client.into_split();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while r.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(String::from_utf8(line).unwrap(), "127.0.0.12");

        proxy.set(
            2,
            1,
            LinkFault {
                delay_ms: 150,
                jitter_ms: 0,
                loss_pct: 0,
            },
        );
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echoed, payload, "bytes intact and in order");
        assert!(started.elapsed() >= Duration::from_millis(150));
        let stats = proxy.stats();
        assert_eq!(stats.connections, 1);
        assert!(stats.delayed > 0 && stats.lost == 0, "{stats:?}");
        echo.await.unwrap();
    }
}
