//! node: the composition root. Wires storage, raft, the cluster facade and both listeners for
//! one node, forms the cluster on first start, and tears everything down in reverse order.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use axum_server::Handle;
use tokio::sync::watch;
use tracing::Instrument;

use crate::api::{self, ApiState};
use crate::authz::{AclCommand, PolicyFile};
use crate::config::ClientAuth as ClientAuthMode;
use crate::config::Config;
use crate::crypto::{Keyring, Sealer};
use crate::raft::{rpc_router, Cluster, ClusterSettings, Member, NetworkFactory, Peers, Raft};
use crate::reload;
use crate::snapshot;
use crate::storage::{LogStore, StateMachine, Store};
use crate::tls::{self, ClientAuth, TlsFiles, TlsMaterial};
use crate::token::{TokenSettings, TokenVerifier};

/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Listeners bound by the caller (tests may bind port 0); `None` binds the configured addresses.
#[derive(Default)]
pub struct Listeners {
    pub api: Option<TcpListener>,
    pub raft: Option<TcpListener>,
}

/// One-off startup requests (command-line flags, not configuration).
#[derive(Debug, Default)]
pub struct Options {
    /// `--restore-from FILE`: once the (new) cluster has formed, and only if it holds no data
    /// and was never restored, replace its state with this backup.
    pub restore_from: Option<PathBuf>,
}

fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .with_context(|| format!("cannot bind the {what} listener on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn raft_config(cfg: &Config) -> anyhow::Result<openraft::Config> {
    let r = &cfg.raft;
    let c = openraft::Config {
        cluster_name: "cairn".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_min_ms,
        election_timeout_max: r.election_max_ms,
        // Snapshots travel in one request; the default 200 ms would never let a large one finish.
        install_snapshot_timeout: 60_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: r.max_in_snapshot_log_to_keep,
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    c.validate().context("raft timing")
}

/// Runs one node until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("node", node_id = cfg.node_id);
    serve(cfg, listeners, options, shutdown)
        .instrument(span)
        .await
}

async fn serve(
    cfg: Config,
    listeners: Listeners,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let id = cfg.node_id;

    // Access control inputs are checked before anything starts: a bad policy file or JWKS
    // is a startup error, not a surprise at the first request.
    let policy = match &cfg.acl.policy_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("acl.policy_file {}", path.display()))?;
            Some(
                PolicyFile::from_toml(&text)
                    .with_context(|| format!("acl.policy_file {}", path.display()))?,
            )
        }
        None => None,
    };
    let tokens = match &cfg.jwt {
        Some(j) => Some(Arc::new(
            TokenVerifier::load(TokenSettings {
                jwks: j.jwks.clone(),
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
                identity_claim: j.identity_claim.clone(),
                leeway: Duration::from_secs(j.leeway_seconds),
                trust_domain: cfg.trust_domain.clone(),
            })
            .context("jwt")?,
        )),
        None => None,
    };

    // Storage: refuse to start on data we cannot authenticate.
    let keyring = Keyring::load(&cfg.keyring).context("keyring")?;
    let sealer = Sealer::new(keyring).context("keyring")?;
    // A backup to restore is verified completely before anything starts.
    let restore = match &options.restore_from {
        Some(path) => {
            let (header, state) = snapshot::open_file(path, &sealer)
                .with_context(|| format!("--restore-from {}", path.display()))?;
            tracing::info!(file = %path.display(), from = %header.cluster_id, index = header.last_log_index, instances = state.registry.instance_count(), "backup verified; it is restored once the cluster has formed");
            Some(state)
        }
        None => None,
    };
    let db_dir = cfg.data_dir.join("db");
    create_private_dir(&cfg.data_dir)?;
    let store = Store::open(&db_dir, sealer.clone(), id).context("opening the data directory")?;
    let flush_on_exit = store.clone();
    let store_for_rewrap = store.clone();
    let records = store.verify_all().context("verifying stored records")?;
    tracing::info!(records, dir = %db_dir.display(), "storage verified");
    let sm = StateMachine::open(store.clone()).context("loading the newest snapshot")?;
    let state = sm.shared();

    // TLS: the raft listener admits node certificates of the cluster CA only; the API listener
    // demands a client certificate of the CA (or, in `optional` mode, accepts TLS without one
    // and then needs a token). Peer connections bind this node's own address. All of them
    // follow `material`, which the watcher reloads when the files change.
    let files = TlsFiles {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    };
    let material = TlsMaterial::load(files, &cfg.trust_domain).context("TLS material")?;
    if material.identity() != &crate::identity::Identity::Node(id) {
        anyhow::bail!(
            "tls.cert names {}, but this is node {id}",
            material.identity()
        );
    }
    let client_auth = match cfg.tls.client_auth {
        ClientAuthMode::Required => ClientAuth::Required,
        ClientAuthMode::Optional => ClientAuth::Optional,
    };
    let api_tls = material
        .api_server_config(client_auth)
        .context("API TLS config")?;
    let raft_tls = material.raft_server_config().context("raft TLS config")?;
    let peer_client = material
        .peer_client(
            cfg.listen.raft.ip(),
            Duration::from_millis(cfg.limits.request_timeout_ms),
        )
        .context("peer client")?;
    let peers = Peers::new(peer_client);

    let raft = Raft::new(
        id,
        Arc::new(raft_config(&cfg)?),
        NetworkFactory::new(peers.clone()),
        LogStore::new(store),
        sm,
    )
    .await
    .context("starting raft")?;
    let cluster = Cluster::new(
        id,
        raft.clone(),
        state,
        peers.clone(),
        ClusterSettings {
            request_timeout: Duration::from_millis(cfg.limits.request_timeout_ms),
            lease_check_interval: Duration::from_millis(cfg.leases.check_interval_ms),
            reap_after: Duration::from_secs(cfg.leases.reap_after_seconds),
            trust_domain: cfg.trust_domain.clone(),
            planted_bugs: cfg.chaos.bugs.clone(),
        },
        material.clone(),
    );
    if !cfg.chaos.bugs.is_empty() {
        let bugs: Vec<&str> = cfg.chaos.bugs.iter().map(|b| b.name()).collect();
        tracing::warn!(
            ?bugs,
            "PLANTED BUGS ARE ON: this node breaks its guarantees on purpose"
        );
        cluster.set_fact("planted_bugs", serde_json::json!(bugs));
    }

    let raft_listener = match listeners.raft {
        Some(l) => l,
        None => bind(cfg.listen.raft, "raft")?,
    };
    let api_listener = match listeners.api {
        Some(l) => l,
        None => bind(cfg.listen.api, "API")?,
    };
    let last_backup = Arc::new(std::sync::Mutex::new(None));
    let raft_handle = Handle::new();
    let api_handle = Handle::new();
    let raft_server = tls_server(raft_listener, raft_tls)?
        .handle(raft_handle.clone())
        .serve(rpc_router(cluster.clone()).into_make_service());
    let api_state = ApiState {
        cluster: cluster.clone(),
        identities: cluster.identities().clone(),
        max_body_bytes: cfg.limits.max_body_bytes,
        max_wait: Duration::from_secs(cfg.limits.max_wait_seconds),
        tokens: tokens.clone(),
        sealer: sealer.clone(),
        last_backup: last_backup.clone(),
    };
    let api_server = tls_server(api_listener, api_tls)?
        .handle(api_handle.clone())
        .serve(api::router(api_state).into_make_service());
    let mut raft_task = tokio::spawn(raft_server);
    let mut api_task = tokio::spawn(api_server);
    tracing::info!(api = %cfg.listen.api, raft = %cfg.listen.raft, zone = %cfg.zone, "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let lease_task = tokio::spawn(cluster.clone().run_lease_keeper(stop_rx.clone()));
    let form_task = tokio::spawn(form_cluster(
        cfg.clone(),
        raft.clone(),
        peers,
        stop_rx.clone(),
    ));
    let tls_watcher = reload::spawn_watcher(
        "tls",
        material.files().paths(),
        cfg.tls.reload_interval(),
        {
            let m = material.clone();
            move || {
                m.reload()
                    .map(|o| o.to_string())
                    .map_err(|e| tls::error_chain(&e))
            }
        },
        stop_rx.clone(),
    );
    let jwks_watcher = tokens.as_ref().map(|t| {
        let t = t.clone();
        let path = cfg
            .jwt
            .as_ref()
            .map(|j| j.jwks.clone())
            .into_iter()
            .collect();
        reload::spawn_watcher(
            "jwks",
            path,
            cfg.tls.reload_interval(),
            move || {
                t.reload()
                    .map(|n| format!("{n} keys"))
                    .map_err(|e| e.to_string())
            },
            stop_rx.clone(),
        )
    });
    // Keys: the keyring file is reloaded in place; every change (and a periodic pass)
    // rewraps records sealed with older keys, and reports the records per key.
    let rewrap_now = Arc::new(tokio::sync::Notify::new());
    let keyring_watcher = reload::spawn_watcher(
        "keyring",
        vec![cfg.keyring.clone()],
        cfg.tls.reload_interval(),
        {
            let (sealer, path, notify) = (sealer.clone(), cfg.keyring.clone(), rewrap_now.clone());
            let store = store_for_rewrap.clone();
            move || {
                let ring = Keyring::load(&path).map_err(|e| e.to_string())?;
                // A key may leave the keyring only once no record here needs it: with one
                // keyring file per cluster, a node can get the new file before its own rewrap
                // has finished, and must then keep the old keys until it has.
                let kept = ring.key_ids();
                let per_key = store.records_per_key().map_err(|e| e.to_string())?;
                if let Some((id, n)) = per_key.iter().find(|(id, n)| **n > 0 && !kept.contains(id))
                {
                    notify.notify_one();
                    return Err(format!(
                        "the new keyring drops key {id}, which still seals {n} records on this node; keeping the old keyring until they are rewrapped"
                    ));
                }
                let summary = sealer.reload(ring).map_err(|e| e.to_string())?;
                if summary.changed() {
                    notify.notify_one();
                }
                Ok(summary.to_string())
            }
        },
        stop_rx.clone(),
    );
    let rewrap_task = tokio::spawn(rewrap_keys(
        store_for_rewrap,
        cluster.clone(),
        rewrap_now,
        stop_rx.clone(),
    ));
    let backup_task = cfg.backup.clone().map(|schedule| {
        tokio::spawn(scheduled_backups(
            cluster.clone(),
            sealer.clone(),
            schedule,
            last_backup.clone(),
            stop_rx.clone(),
        ))
    });
    let bootstrap_task = tokio::spawn(bootstrap_cluster(
        cluster.clone(),
        policy,
        restore,
        cfg.node_id,
        stop_rx.clone(),
    ));

    // A listener that dies takes the node down: a node that cannot serve must not linger.
    let mut failure = None;
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        r = &mut api_task => failure = Some(format!("API listener stopped: {r:?}")),
        r = &mut raft_task => failure = Some(format!("raft listener stopped: {r:?}")),
    }
    if let Some(f) = &failure {
        tracing::error!(reason = %f, "shutting down");
    }
    // Reverse order: stop background work, drain the public API, stop raft, close the raft port.
    let _ = stop_tx.send(true);
    let _ = form_task.await;
    let _ = bootstrap_task.await;
    let _ = tls_watcher.await;
    let _ = keyring_watcher.await;
    let _ = rewrap_task.await;
    if let Some(t) = backup_task {
        let _ = t.await;
    }
    if let Some(w) = jwks_watcher {
        let _ = w.await;
    }
    let _ = lease_task.await;
    api_handle.graceful_shutdown(Some(DRAIN));
    if !api_task.is_finished() {
        let _ = api_task.await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    raft_handle.graceful_shutdown(Some(Duration::from_secs(1)));
    if !raft_task.is_finished() {
        let _ = raft_task.await;
    }
    if let Err(e) = flush_on_exit.flush() {
        tracing::warn!(error = %e, "flushing storage at shutdown");
    }
    tracing::info!("stopped");
    match failure {
        Some(f) => anyhow::bail!(f),
        None => Ok(()),
    }
}

/// An HTTPS server on `listener` with `TCP_NODELAY` on every accepted connection: small
/// HTTP/2 frames (raft RPCs, quorum acks) must not wait for Nagle and delayed ACKs.
fn tls_server(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> std::io::Result<axum_server::Server<std::net::SocketAddr, RustlsAcceptor<NoDelayAcceptor>>> {
    let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(Arc::new(config)))
        .acceptor(NoDelayAcceptor::new());
    Ok(axum_server::from_tcp(listener)?.acceptor(acceptor))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data_dir {}", dir.display()))
}

/// Settles what a new cluster needs once it has a leader: a cluster id (a random name, so
/// backups can tell clusters apart) and the configured policy. Every node does this; the
/// state machine applies the first proposal of each and ignores the rest, and never applies
/// a bootstrap after an operator has changed the policy.
async fn bootstrap_cluster(
    cluster: Cluster,
    policy: Option<PolicyFile>,
    mut restore: Option<crate::raft::BackupState>,
    node_id: u64,
    mut stop: watch::Receiver<bool>,
) {
    if policy.is_none() && !cluster.state().read().policy.is_bootstrapped() {
        tracing::warn!("no acl.policy_file and no policy in the cluster yet: every request is denied until a node starts with one");
    }
    let by = crate::identity::Identity::Node(node_id).to_string();
    loop {
        let (has_id, has_policy) = {
            let s = cluster.state().read();
            (s.cluster_id.is_some(), s.policy.is_bootstrapped())
        };
        let policy_due = policy.as_ref().filter(|_| !has_policy);
        if has_id && policy_due.is_none() && restore.is_none() {
            return;
        }
        if cluster.leader().is_some() {
            if let Some(state) = restore.take() {
                match cluster.restore(state.clone(), &by, true).await {
                    Ok((true, index)) => tracing::info!(index, "backup restored (--restore-from)"),
                    Ok((false, _)) => tracing::warn!("--restore-from ignored: the cluster already holds data or was restored before"),
                    Err(e) => {
                        tracing::warn!(error = %e, "restore not yet possible; retrying");
                        restore = Some(state);
                    }
                }
            }
            if !has_id {
                let id = hex::encode(rand::random::<[u8; 16]>());
                match cluster.set_cluster_id(id, &by).await {
                    Ok(()) => {}
                    Err(e) => tracing::debug!(error = %e, "cluster id not yet proposed; retrying"),
                }
            }
            if let Some(p) = policy_due {
                match cluster
                    .acl_write(AclCommand::Bootstrap(p.clone()), &by)
                    .await
                {
                    Ok(res) => {
                        tracing::info!(outcome = ?res.outcome, index = res.index, "policy bootstrap proposed")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "policy bootstrap not yet possible; retrying")
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Rewraps records sealed with older keys after every keyring change and every 10 minutes,
/// and publishes the records per key for the status.
async fn rewrap_keys(
    store: Store,
    cluster: Cluster,
    now: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.rewrap(512)).await {
            Ok(Ok(report)) => {
                if report.rewrapped > 0 {
                    tracing::info!(rewrapped = report.rewrapped, records_per_key = ?report.records_per_key, "records rewrapped under the active key");
                }
                cluster.set_fact("records_per_key", serde_json::json!(report.records_per_key));
            }
            Ok(Err(e)) => tracing::error!(error = %e, "rewrap failed; retrying later"),
            Err(e) => tracing::error!(error = %e, "rewrap task failed"),
        }
        cluster.set_fact("keyring", serde_json::json!(store.sealer().status()));
        tokio::select! {
            _ = now.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// On the leader, writes a verified backup every `interval_seconds` into `dir`, keeping the
/// newest `keep`; the last good one is reported in the status.
async fn scheduled_backups(
    cluster: Cluster,
    sealer: Sealer,
    schedule: crate::config::BackupSchedule,
    last: Arc<std::sync::Mutex<Option<snapshot::BackupRun>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(schedule.interval_seconds));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick fires at once; the first backup waits one interval
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !cluster.is_leader() {
            continue;
        }
        match snapshot::scheduled(&cluster, &sealer, &schedule.dir, schedule.keep).await {
            Ok(run) => {
                tracing::info!(path = %run.path.display(), bytes = run.bytes, index = run.last_log_index, "scheduled backup written and verified");
                cluster.set_fact("last_backup", serde_json::json!(run));
                *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(run);
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %schedule.dir.display(), "scheduled backup failed")
            }
        }
    }
}

/// Forms the cluster once: the member with the lowest id initializes it when every initial
/// member is reachable and none is initialized yet. Never runs on a node that already has
/// raft state, so a restart never re-initializes.
async fn form_cluster(cfg: Config, raft: Raft, peers: Peers, mut stop: watch::Receiver<bool>) {
    match raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "raft stopped before formation");
            return;
        }
    }
    let first = cfg.members.iter().map(|m| m.id).min();
    if first != Some(cfg.node_id) {
        tracing::info!("waiting to be contacted by the cluster");
        return;
    }
    let members: BTreeMap<u64, Member> = cfg
        .members
        .iter()
        .map(|m| {
            (
                m.id,
                Member {
                    api: m.api.to_string(),
                    raft: m.raft.to_string(),
                    zone: m.zone.clone(),
                },
            )
        })
        .collect();
    let mut announced = false;
    loop {
        let mut all_ready = true;
        for m in cfg.members.iter().filter(|m| m.id != cfg.node_id) {
            let probe: Result<crate::raft::Probe, _> = peers
                .call(
                    &m.raft.to_string(),
                    "/internal/probe",
                    &(),
                    Duration::from_secs(2),
                )
                .await;
            match probe {
                Ok(p) if p.initialized => {
                    tracing::info!(
                        peer = m.id,
                        "peer already belongs to a cluster; not initializing"
                    );
                    return;
                }
                Ok(p) if p.node_id != m.id => {
                    tracing::error!(
                        peer = m.id,
                        found = p.node_id,
                        "peer answers with another node id"
                    );
                    all_ready = false;
                }
                Ok(_) => {}
                Err(e) => {
                    if !announced {
                        tracing::info!(peer = m.id, error = %e, "waiting for initial members");
                    }
                    all_ready = false;
                }
            }
        }
        if all_ready {
            match raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!(members = members.len(), "cluster initialized"),
                Err(e) => tracing::info!(error = %e, "cluster already initialized"),
            }
            return;
        }
        announced = true;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}
