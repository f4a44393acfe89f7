//! The `cairn` binary: argument parsing and exit codes (0 ok, 1 error with one line on
//! stderr, 2 usage); everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Value};

use cairn::certs::{self, CertAuthority, IssueRequest, Validity};
use cairn::client::Client;
use cairn::config::{Config, Overrides};
use cairn::crypto::Keyring;
use cairn::identity::Identity;

/// mimalloc instead of glibc's malloc: the registry is millions of small strings; on a loaded
/// cluster glibc spent ~8% of the leader's CPU in malloc/free (perf), and mimalloc cut the
/// nodes' CPU per write by ~12% (same run, same data).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cairn", version, about = "A secure internal service registry")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a cluster.
    Server(ServerArgs),
    /// Start a throwaway local cluster (CA and certificates generated) until Ctrl-C.
    Dev(DevArgs),
    /// Offline certificate authority.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Offline keyring tools.
    #[command(subcommand)]
    Keyring(KeyringCmd),
    /// Register (or update) an instance.
    Register(RegisterArgs),
    /// Deregister an instance.
    Deregister(InstanceArgs),
    /// Renew an instance's lease.
    Heartbeat(InstanceArgs),
    /// List services.
    Services(ServicesArgs),
    /// List a service's instances.
    Query(QueryArgs),
    /// Cluster operations.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Access control: roles, bindings, and who you are.
    #[command(subcommand)]
    Acl(AclCmd),
    /// Backups: save, inspect and restore snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Load generator: cairn's REST API or etcd's v3 gateway, over mTLS (scripts/bench).
    #[command(subcommand)]
    Bench(cairn::bench::BenchCommand),
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Download a backup of the cluster state into FILE (any node; retried on the next).
    Save {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a backup's header and verify every chunk, without restoring it.
    Inspect {
        file: PathBuf,
        /// A keyring holding the backup key (a node's, or `cairn keyring export-backup`).
        #[arg(long, env = "CAIRN_KEYRING", required_unless_present = "header_only")]
        keyring: Option<PathBuf>,
        /// Only read the header (no key needed; chunks are not verified).
        #[arg(long)]
        header_only: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Replace the whole cluster state with a backup.
    Restore {
        file: PathBuf,
        /// Restore a backup taken from another cluster.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum AclCmd {
    /// Show the caller's identity and the permissions it holds.
    Whoami {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roles: named sets of actions on service-name patterns.
    #[command(subcommand)]
    Role(AclObjectCmd),
    /// Bindings: attach roles to identity patterns.
    #[command(subcommand)]
    Binding(AclObjectCmd),
}

#[derive(Subcommand)]
enum AclObjectCmd {
    /// List all.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one.
    Get {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create or replace one from a JSON or TOML file (`.toml`); its `name` is the one given.
    Put {
        name: String,
        /// The definition (JSON, or TOML when the name ends in `.toml`).
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete one.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Node configuration file (TOML).
    #[arg(long, env = "CAIRN_CONFIG")]
    config: PathBuf,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `log` (a tracing filter such as `info` or `cairn=debug`).
    #[arg(long)]
    log: Option<String>,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<u64>,
    /// Start a new cluster from this backup file: once the cluster has formed, and only if it
    /// holds no data, its state is replaced by the backup's (verified before the node starts).
    #[arg(long)]
    restore_from: Option<PathBuf>,
}

#[derive(Args)]
struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    nodes: u8,
    /// Keep everything (certificates, configs, data, logs) here; reused on the next run.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a new cluster CA (ca.pem, ca-key.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cairn.local")]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a node, service or operator certificate signed by the CA in --ca-dir.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, value_enum)]
        kind: CertKind,
        /// Node id (for nodes) or name (for services and operators).
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "cairn.local")]
        trust_domain: String,
        /// IP SANs (nodes: the node's address).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// DNS SANs.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Output directory; writes <stem>.pem and <stem>-key.pem.
        #[arg(long)]
        out_dir: PathBuf,
        /// File stem; default `<kind>-<name>`.
        #[arg(long)]
        stem: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write a trust bundle of several CA certificates (old and new CA during a rotation).
    Bundle {
        /// The bundle to write (mode 0644, replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// CA certificate files, e.g. old/ca.pem new/ca.pem.
        #[arg(required = true)]
        cas: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CertKind {
    Node,
    Service,
    Operator,
}

#[derive(Subcommand)]
enum KeyringCmd {
    /// Write a new keyring file (mode 0600) with one random data key and one backup key.
    Generate {
        #[arg(long)]
        out: PathBuf,
        /// No backup key (e.g. to import another cluster's with `import-backup`).
        #[arg(long)]
        without_backup_key: bool,
    },
    /// Add a new data key and make it active (old keys stay to open older records).
    Rotate {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
    },
    /// Add a new backup key and make it the one new backups use.
    AddBackupKey {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
    },
    /// Remove a key (never the active data key or the current backup key).
    Remove {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
        #[arg(long)]
        id: u32,
    },
    /// Show the keys (ids, purposes, dates; never key bytes).
    Status {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
    },
    /// Write a keyring with only the backup keys, for the backup system.
    ExportBackup {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a backup key from another keyring file (to restore another cluster's backups).
    ImportBackup {
        #[arg(long, env = "CAIRN_KEYRING")]
        keyring: PathBuf,
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        id: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Args)]
struct ClientArgs {
    /// Comma-separated API endpoints (any node), tried in order.
    #[arg(
        long,
        env = "CAIRN_ENDPOINTS",
        default_value = "127.0.0.11:7400,127.0.0.12:7400,127.0.0.13:7400"
    )]
    endpoints: String,
    /// CA certificate.
    #[arg(long, env = "CAIRN_CA")]
    ca: PathBuf,
    /// Client certificate.
    #[arg(long, env = "CAIRN_CERT")]
    cert: PathBuf,
    /// Client private key.
    #[arg(long, env = "CAIRN_KEY")]
    key: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Request timeout in seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// A file holding a JWT bearer token to send (the certificate still secures the connection).
    #[arg(long, env = "CAIRN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct InstanceArgs {
    service: String,
    id: String,
    /// Only if the instance's modify_index equals this.
    #[arg(long)]
    if_match: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct RegisterArgs {
    service: String,
    id: String,
    #[arg(long)]
    address: String,
    #[arg(long)]
    port: u16,
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// key=value, repeatable.
    #[arg(long = "meta")]
    meta: Vec<String>,
    #[arg(long)]
    zone: Option<String>,
    /// Lease in seconds; renew with `cairn heartbeat`.
    #[arg(long)]
    ttl: Option<u32>,
    /// Compare-and-set on modify_index.
    #[arg(long)]
    if_match: Option<u64>,
    /// Create only (fail if it exists).
    #[arg(long)]
    create_only: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct ServicesArgs {
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct QueryArgs {
    service: String,
    #[arg(long)]
    healthy: bool,
    #[arg(long)]
    tag: Option<String>,
    #[arg(long)]
    zone: Option<String>,
    #[arg(long)]
    near: Option<String>,
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term, indices and members.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node (as a learner, then promoted to voter unless --learner).
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        api: String,
        #[arg(long)]
        raft: String,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        to: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a node.
    Remove {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Server(a) => server(a).await,
        Cmd::Dev(a) => {
            if a.nodes == 4 {
                bail!(
                    "--nodes: a cluster has 3 or 5 nodes (an even count adds no fault tolerance)"
                );
            }
            cairn::dev::run(usize::from(a.nodes), a.dir).await
        }
        Cmd::Certs(c) => certs_cmd(c),
        Cmd::Keyring(k) => keyring_cmd(k),
        Cmd::Snapshot(c) => snapshot_cmd(c).await,
        Cmd::Register(a) => register(a).await,
        Cmd::Deregister(a) => {
            let headers = if_match(a.if_match);
            let path = instance_path(&a.service, &a.id);
            let reply = connect(&a.client)?
                .request(Method::DELETE, &path, None, &headers)
                .await?;
            print(a.client.output, &reply.body, || {
                format!("deregistered {}/{}", a.service, a.id)
            });
            Ok(())
        }
        Cmd::Heartbeat(a) => {
            let path = format!("{}/heartbeat", instance_path(&a.service, &a.id));
            let reply = connect(&a.client)?
                .request(Method::PUT, &path, None, &[])
                .await?;
            print(a.client.output, &reply.body, || {
                format!(
                    "renewed {}/{} for {}s",
                    a.service, a.id, reply.body["ttl_seconds"]
                )
            });
            Ok(())
        }
        Cmd::Services(a) => {
            let path = if a.stale {
                "/v1/services?consistency=stale"
            } else {
                "/v1/services"
            };
            let reply = connect(&a.client)?
                .request(Method::GET, path, None, &[])
                .await?;
            print(a.client.output, &reply.body, || {
                let mut out = format!("{:<32} {:>9} {:>8}", "SERVICE", "INSTANCES", "PASSING");
                for s in reply.body["services"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:<32} {:>9} {:>8}",
                        s["name"].as_str().unwrap_or("?"),
                        s["instances"].as_u64().unwrap_or(0),
                        s["passing"].as_u64().unwrap_or(0)
                    ));
                }
                out
            });
            Ok(())
        }
        Cmd::Query(a) => query(a).await,
        Cmd::Cluster(c) => cluster_cmd(c).await,
        Cmd::Acl(c) => acl_cmd(c).await,
        Cmd::Bench(c) => cairn::bench::run(c).await,
    }
}

async fn server(a: ServerArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        data_dir: a.data_dir,
        log: a.log,
        node_id: a.node_id,
    };
    let cfg = Config::load(&a.config, &overrides)?;
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .with_context(|| format!("invalid log filter `{}`", cfg.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let options = cairn::node::Options {
        restore_from: a.restore_from,
    };
    cairn::node::run(cfg, Default::default(), options, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn certs_cmd(c: CertsCmd) -> anyhow::Result<()> {
    match c {
        CertsCmd::Init {
            dir,
            trust_domain,
            days,
        } => {
            std::fs::create_dir_all(&dir)?;
            let ca_cert = dir.join("ca.pem");
            if ca_cert.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a CA",
                    ca_cert.display()
                );
            }
            let ca = CertAuthority::generate(&trust_domain, Validity::days(days))?;
            certs::write_ca_files(&dir, &ca)?;
            println!(
                "wrote {} and {}",
                ca_cert.display(),
                dir.join("ca-key.pem").display()
            );
            Ok(())
        }
        CertsCmd::Issue {
            ca_dir,
            kind,
            name,
            trust_domain,
            ips,
            dns,
            out_dir,
            stem,
            days,
        } => {
            let ca = CertAuthority::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))?;
            let identity = match kind {
                CertKind::Node => {
                    Identity::Node(name.parse().context("--name: a node id is a number >= 1")?)
                }
                CertKind::Service => Identity::Service(name.clone()),
                CertKind::Operator => Identity::Operator(name.clone()),
            };
            let issued = ca.issue(&IssueRequest {
                identity,
                trust_domain,
                ips,
                dns,
                validity: Validity::days(days),
            })?;
            std::fs::create_dir_all(&out_dir)?;
            let kind_name = match kind {
                CertKind::Node => "node",
                CertKind::Service => "service",
                CertKind::Operator => "operator",
            };
            let stem = stem.unwrap_or_else(|| format!("{kind_name}-{name}"));
            let (cert, key) = certs::write_pem_files(&out_dir, &stem, &issued)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        CertsCmd::Bundle { out, cas } => {
            let n = certs::write_bundle(&out, &cas)?;
            println!("wrote {} ({n} CA certificates)", out.display());
            Ok(())
        }
    }
}

fn connect(a: &ClientArgs) -> anyhow::Result<Client> {
    let endpoints = vec![a.endpoints.clone()];
    let client = Client::new(
        &endpoints,
        &a.ca,
        &a.cert,
        &a.key,
        Duration::from_secs(a.timeout),
    )?;
    Ok(match &a.token_file {
        None => client,
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?;
            client.with_bearer_token(token.trim())?
        }
    })
}

fn keyring_cmd(k: KeyringCmd) -> anyhow::Result<()> {
    let load =
        |path: &PathBuf| Keyring::load(path).with_context(|| format!("keyring {}", path.display()));
    let save = |ring: &Keyring, path: &PathBuf| {
        ring.replace_file(path)
            .with_context(|| format!("writing {}", path.display()))
    };
    match k {
        KeyringCmd::Generate {
            out,
            without_backup_key,
        } => {
            let mut ring = Keyring::generate();
            if !without_backup_key {
                ring.add_backup_key()?;
            }
            ring.write_new(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        KeyringCmd::Rotate { keyring } => {
            let mut ring = load(&keyring)?;
            let id = ring.rotate()?;
            save(&ring, &keyring)?;
            println!("key {id} is now the active data key of {}; nodes pick it up without a restart, and rewrap older records in the background", keyring.display());
        }
        KeyringCmd::AddBackupKey { keyring } => {
            let mut ring = load(&keyring)?;
            let id = ring.add_backup_key()?;
            save(&ring, &keyring)?;
            println!("key {id} is now the backup key of {}", keyring.display());
        }
        KeyringCmd::Remove { keyring, id } => {
            let mut ring = load(&keyring)?;
            ring.remove(id)?;
            save(&ring, &keyring)?;
            println!("removed key {id} from {}", keyring.display());
        }
        KeyringCmd::Status { keyring } => {
            let ring = load(&keyring)?;
            print(Output::Json, &json!(ring.status()), String::new);
        }
        KeyringCmd::ExportBackup { keyring, out } => {
            let ring = load(&keyring)?.export_backup_keys()?;
            ring.write_new(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} (backup keys only)", out.display());
        }
        KeyringCmd::ImportBackup { keyring, from, id } => {
            let mut ring = load(&keyring)?;
            ring.import_backup_key(&load(&from)?, id)?;
            save(&ring, &keyring)?;
            println!("imported backup key {id} into {}", keyring.display());
        }
    }
    Ok(())
}

async fn snapshot_cmd(c: SnapshotCmd) -> anyhow::Result<()> {
    match c {
        SnapshotCmd::Save { file, client } => {
            let (bytes, endpoint) = connect(&client)?.download("/v1/snapshot", &file).await?;
            // Check what arrived before calling it a backup: the header must parse and the
            // length must be the one it announces.
            let mut f = std::fs::File::open(&file)?;
            let header = cairn::backup::read_header(&mut f)
                .with_context(|| format!("{} is not a backup file", file.display()))?;
            let expected = cairn::backup::file_len(&header);
            if expected != bytes {
                bail!(
                    "{}: {bytes} bytes, but its header announces {expected}",
                    file.display()
                );
            }
            let v = json!({"file": file, "bytes": bytes, "from": endpoint, "header": header});
            print(client.output, &v, || {
                format!(
                    "saved {} ({bytes} bytes) from {endpoint}: cluster {}, index {}, {} instances",
                    file.display(),
                    header.cluster_id,
                    header.last_log_index,
                    header.counts.get("instances").copied().unwrap_or(0)
                )
            });
            Ok(())
        }
        SnapshotCmd::Inspect {
            file,
            keyring,
            header_only,
            output,
        } => {
            let open = || {
                std::fs::File::open(&file)
                    .map(std::io::BufReader::new)
                    .with_context(|| format!("{}", file.display()))
            };
            let (header, stats) = if header_only {
                (cairn::backup::read_header(&mut open()?)?, None)
            } else {
                let path = keyring.context("--keyring is required to verify the chunks")?;
                let ring =
                    Keyring::load(&path).with_context(|| format!("keyring {}", path.display()))?;
                let (h, st) = cairn::backup::verify(open()?, |id| ring.backup_cipher(id))
                    .with_context(|| format!("{} is corrupt", file.display()))?;
                (h, Some(st))
            };
            let v = json!({
                "file": file,
                "verified": stats.is_some(),
                "header": header,
                "chunks": stats.map(|s| s.chunks),
                "plaintext_bytes": stats.map(|s| s.plaintext_bytes),
                "file_bytes": stats.map(|s| s.file_bytes),
            });
            print(output, &v, || {
                let counts: Vec<String> = header
                    .counts
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                let verdict = match stats {
                    Some(st) => format!(
                        "valid: {} chunks verified, {} bytes of state, {} bytes",
                        st.chunks, st.plaintext_bytes, st.file_bytes
                    ),
                    None => "header only (chunks not verified)".into(),
                };
                format!(
                    "{}: {verdict}\n  format {}, cluster {}, index {} (term {}), created {}\n  {}\n  backup key {}, chunk size {}",
                    file.display(),
                    header.format_version,
                    header.cluster_id,
                    header.last_log_index,
                    header.last_log_term,
                    header.created_at_rfc3339,
                    counts.join(", "),
                    header.backup_key_id,
                    header.chunk_size
                )
            });
            Ok(())
        }
        SnapshotCmd::Restore {
            file,
            force,
            client,
        } => {
            let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
            cairn::backup::read_header(&mut bytes.as_slice())
                .with_context(|| format!("{} is not a backup file", file.display()))?;
            let path = if force {
                "/v1/snapshot/restore?force=true"
            } else {
                "/v1/snapshot/restore"
            };
            let reply = connect(&client)?.upload(path, bytes).await?;
            print(client.output, &reply.body, || {
                format!(
                    "restored {} at index {}: {}",
                    file.display(),
                    reply.body["index"],
                    reply.body["restored"]["counts"]
                )
            });
            Ok(())
        }
    }
}

async fn acl_cmd(c: AclCmd) -> anyhow::Result<()> {
    let (kind, cmd) = match c {
        AclCmd::Whoami { client } => {
            let reply = connect(&client)?
                .request(Method::GET, "/v1/acl/whoami", None, &[])
                .await?;
            let b = &reply.body;
            print(client.output, b, || {
                let mut out = format!(
                    "{} (by {})",
                    b["identity"].as_str().unwrap_or("?"),
                    b["authenticated_by"].as_str().unwrap_or("?")
                );
                for g in b["grants"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n  role {:<20} via binding {:<20} {}",
                        g["role"].as_str().unwrap_or("?"),
                        g["binding"].as_str().unwrap_or("?"),
                        g["rules"]
                    ));
                }
                out
            });
            return Ok(());
        }
        AclCmd::Role(cmd) => ("roles", cmd),
        AclCmd::Binding(cmd) => ("bindings", cmd),
    };
    let (client, reply) = match cmd {
        AclObjectCmd::List { client } => {
            let path = format!("/v1/acl/{kind}");
            let reply = connect(&client)?
                .request(Method::GET, &path, None, &[])
                .await?;
            (client, reply)
        }
        AclObjectCmd::Get { name, client } => {
            let path = format!("/v1/acl/{kind}/{name}");
            let reply = connect(&client)?
                .request(Method::GET, &path, None, &[])
                .await?;
            (client, reply)
        }
        AclObjectCmd::Put { name, file, client } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("--file {}", file.display()))?;
            let mut body: Value = if file.extension().is_some_and(|e| e == "toml") {
                toml::from_str(&text).with_context(|| format!("--file {}", file.display()))?
            } else {
                serde_json::from_str(&text).with_context(|| format!("--file {}", file.display()))?
            };
            let Some(obj) = body.as_object_mut() else {
                bail!("--file {}: expected a table/object", file.display());
            };
            obj.insert("name".into(), json!(name));
            let path = format!("/v1/acl/{kind}/{name}");
            let reply = connect(&client)?
                .request(Method::PUT, &path, Some(&body), &[])
                .await?;
            (client, reply)
        }
        AclObjectCmd::Delete { name, client } => {
            let path = format!("/v1/acl/{kind}/{name}");
            let reply = connect(&client)?
                .request(Method::DELETE, &path, None, &[])
                .await?;
            (client, reply)
        }
    };
    print(client.output, &reply.body, || {
        serde_json::to_string_pretty(&reply.body).unwrap_or_default()
    });
    Ok(())
}

fn instance_path(service: &str, id: &str) -> String {
    format!("/v1/services/{service}/instances/{id}")
}

fn if_match(v: Option<u64>) -> Vec<(&'static str, String)> {
    v.map(|i| vec![("if-match", i.to_string())])
        .unwrap_or_default()
}

fn print(output: Output, body: &Value, text: impl FnOnce() -> String) {
    use std::io::Write;
    let out = match output {
        Output::Json => serde_json::to_string_pretty(body).unwrap_or_default(),
        Output::Text => text(),
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(std::io::stdout(), "{out}");
}

async fn register(a: RegisterArgs) -> anyhow::Result<()> {
    let mut meta = serde_json::Map::new();
    for kv in &a.meta {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--meta `{kv}`: expected key=value"))?;
        meta.insert(k.to_string(), Value::String(v.to_string()));
    }
    let mut body = json!({"address": a.address, "port": a.port, "tags": a.tags, "meta": meta});
    if let Some(z) = &a.zone {
        body["zone"] = json!(z);
    }
    if let Some(t) = a.ttl {
        body["ttl_seconds"] = json!(t);
    }
    let mut headers = if_match(a.if_match);
    if a.create_only {
        headers.push(("if-none-match", "*".to_string()));
    }
    let reply = connect(&a.client)?
        .request(
            Method::PUT,
            &instance_path(&a.service, &a.id),
            Some(&body),
            &headers,
        )
        .await?;
    print(a.client.output, &reply.body, || {
        format!(
            "registered {}/{} (modify_index {})",
            a.service, a.id, reply.body["modify_index"]
        )
    });
    Ok(())
}

async fn query(a: QueryArgs) -> anyhow::Result<()> {
    let mut params = vec![];
    if a.healthy {
        params.push("healthy=true".to_string());
    }
    for (k, v) in [("tag", &a.tag), ("zone", &a.zone), ("near", &a.near)] {
        if let Some(v) = v {
            params.push(format!("{k}={v}"));
        }
    }
    if a.stale {
        params.push("consistency=stale".into());
    }
    let mut path = format!("/v1/services/{}", a.service);
    if !params.is_empty() {
        path = format!("{path}?{}", params.join("&"));
    }
    let reply = connect(&a.client)?
        .request(Method::GET, &path, None, &[])
        .await?;
    print(a.client.output, &reply.body, || {
        let mut out = format!(
            "{:<24} {:<28} {:<9} {:<10} TAGS",
            "ID", "ADDRESS", "HEALTH", "ZONE"
        );
        for i in reply.body["instances"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n{:<24} {:<28} {:<9} {:<10} {}",
                i["id"].as_str().unwrap_or("?"),
                format!("{}:{}", i["address"].as_str().unwrap_or("?"), i["port"]),
                i["health"].as_str().unwrap_or("?"),
                i["zone"].as_str().unwrap_or("-"),
                i["tags"]
                    .as_array()
                    .map(|t| t
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            ));
        }
        out
    });
    Ok(())
}

async fn cluster_cmd(c: ClusterCmd) -> anyhow::Result<()> {
    let (client, reply) = match c {
        ClusterCmd::Status { client } => {
            let reply = connect(&client)?
                .request(Method::GET, "/v1/cluster/status", None, &[])
                .await?;
            (client, reply)
        }
        ClusterCmd::Add {
            id,
            api,
            raft,
            zone,
            learner,
            client,
        } => {
            let body = json!({"id": id, "api": api, "raft": raft, "zone": zone, "voter": !learner});
            let reply = connect(&client)?
                .request(Method::POST, "/v1/cluster/members", Some(&body), &[])
                .await?;
            (client, reply)
        }
        ClusterCmd::TransferLeader { to, client } => {
            let body = json!({ "to": to });
            let reply = connect(&client)?
                .request(
                    Method::POST,
                    "/v1/cluster/transfer-leader",
                    Some(&body),
                    &[],
                )
                .await?;
            (client, reply)
        }
        ClusterCmd::Remove { id, client } => {
            let reply = connect(&client)?
                .request(
                    Method::DELETE,
                    &format!("/v1/cluster/members/{id}"),
                    None,
                    &[],
                )
                .await?;
            (client, reply)
        }
    };
    let b = &reply.body;
    print(client.output, b, || {
        let mut out = format!(
            "node {} ({}), leader {}, term {}, commit {}, applied {}\n{:<4} {:<22} {:<22} {:<10} {:<8} LAST_CONTACT_MS",
            b["node_id"], b["state"].as_str().unwrap_or("?"), b["leader"], b["term"], b["commit_index"], b["applied_index"],
            "ID", "API", "RAFT", "ZONE", "ROLE"
        );
        for m in b["members"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n{:<4} {:<22} {:<22} {:<10} {:<8} {}",
                m["id"],
                m["api"].as_str().unwrap_or("?"),
                m["raft"].as_str().unwrap_or("?"),
                m["zone"].as_str().unwrap_or("?"),
                m["role"].as_str().unwrap_or("?"),
                m["last_contact_ms"]
            ));
        }
        out
    });
    Ok(())
}
