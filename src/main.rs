//! `snapsync`: replicate block-volume snapshots between storage systems, sending only
//! what changed.
//!
//! This binary is the thin edge: it parses arguments, reads the environment into
//! [`snapsync::OpenOptions`], adapts progress to a terminal and prints results.
//! Everything else lives in the `snapsync` library (`src/lib.rs`) and the crates under
//! `crates/`.

mod allocator;
mod commands;
mod daemon;
mod demo;
mod export;
mod progress;
mod serve;
mod signals;
mod stores;

use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use snapsync_repo::PruneOptions;
use stores::{ClientArgs, Usage};

/// Replicate block-volume snapshots between storage systems, sending only what changed.
#[derive(Debug, Parser)]
#[command(name = "snapsync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    secrets: stores::SecretArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a repository.
    Init {
        /// Where: file:///ABS/PATH or a plain path.
        repo: String,
        /// Block size in bytes (a power of two, 512 B to 16 MiB).
        #[arg(long, default_value_t = snapsync_repo::DEFAULT_BLOCK_SIZE)]
        block_size: u64,
        /// Encrypt everything stored (format version 3) under a random key wrapped by
        /// the passphrase (--password-file or SNAPSYNC_PASSWORD) or --key-file.
        #[arg(long)]
        encryption: bool,
    },
    /// Manage the passphrases and key files of an encrypted repository.
    Key {
        #[command(subcommand)]
        action: KeyCommand,
    },
    /// List volumes and their snapshots.
    List {
        /// Store URL.
        store: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the changed extents between two snapshots.
    Diff {
        /// Store URL.
        store: String,
        #[command(flatten)]
        client: ClientArgs,
        /// VOLUME@SNAPSHOT
        target: String,
        /// Base snapshot of the same volume; without it, the snapshot's data extents.
        #[arg(long)]
        base: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replicate snapshots from SOURCE to DEST.
    Replicate {
        /// Source store URL.
        source: String,
        /// Destination store URL.
        dest: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Only these volumes (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Only this snapshot, instead of every one the destination lacks (for a
        /// running VM: the name of the checkpoint taken).
        #[arg(long)]
        snapshot: Option<String>,
        /// For a running VM (qemu:///): checkpoints kept per disk after the run.
        #[arg(long, default_value_t = snapsync_qemu::DEFAULT_KEEP_CHECKPOINTS, value_parser = clap::value_parser!(usize))]
        keep_checkpoints: usize,
        /// Print one JSON object per replicated snapshot.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot out as an image, identical to the snapshot.
    Restore {
        /// Store URL.
        store: String,
        #[command(flatten)]
        client: ClientArgs,
        /// VOLUME@SNAPSHOT
        target: String,
        /// Output file (or device).
        output: std::path::PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = commands::OutputFormat::Raw)]
        format: commands::OutputFormat,
    },
    /// Check a repository; exits 1 naming every damaged snapshot.
    Verify {
        /// Repository URL.
        repo: String,
        /// Also read and re-hash every stored block.
        #[arg(long)]
        read_data: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots by retention rules, keeping every chain valid.
    Prune {
        /// Repository URL.
        repo: String,
        #[command(flatten)]
        options: PruneOptions,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete blocks, packs and manifests no snapshot references.
    Gc {
        /// Repository URL.
        repo: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve local stores to snapsync clients (snapsync://HOST:PORT/NAME).
    #[command(group(ArgGroup::new("transport").required(true).args(["tls_cert", "insecure_plaintext"])))]
    Serve {
        /// Address to listen on, ADDR:PORT (port 0: any free port, printed when ready).
        #[arg(long)]
        listen: String,
        /// NAME=URL of a store to serve (repeatable).
        #[arg(long = "store", required = true)]
        stores: Vec<String>,
        /// The tokens it accepts: one per line, or `TOKEN STORE ro|rw`.
        #[arg(long, required = true)]
        token_file: std::path::PathBuf,
        /// TLS certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Serve without TLS (clients then use snapsync+http://).
        #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
        insecure_plaintext: bool,
    },
    /// Serve a snapshot read-only over NBD (instant restore) until SIGINT/SIGTERM.
    Export {
        /// Store URL (any readable store).
        store: String,
        #[command(flatten)]
        client: ClientArgs,
        /// VOLUME@SNAPSHOT
        target: String,
        /// unix:PATH, or HOST:PORT (port 0: any free port, printed when ready).
        #[arg(long)]
        listen: String,
        /// The export's name (default: VOLUME@SNAPSHOT).
        #[arg(long)]
        name: Option<String>,
        /// Bytes of decoded data to cache (suffixes K, M, G, KiB, MiB, GiB).
        #[arg(long, default_value = "256MiB")]
        cache_size: String,
        /// TLS certificate chain (PEM): clients must STARTTLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Serve TCP without TLS on an address other than loopback.
        #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
        insecure_plaintext: bool,
    },
    /// Run replication jobs on schedules (TOML config) until SIGTERM or SIGINT; SIGHUP
    /// reloads the config.
    Daemon {
        /// The config file.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Only check the config: exit 0, or 1 naming the line and field that is wrong.
        #[arg(long)]
        check: bool,
        /// Log lines as text or as JSON objects (on stderr).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show the daemon's jobs: last runs, lag, next runs (asks the running daemon).
    Status {
        /// The daemon's config file (for its control socket).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job of the daemon now and exit with its result (0: every destination
    /// succeeded).
    RunJob {
        /// The job's name.
        name: String,
        /// The daemon's config file (for its control socket).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A self-contained walkthrough on generated sample data.
    Demo {
        /// Work directory (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Size of the sample volume in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
}

/// `snapsync key ...`.
#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Add a passphrase (or key file) that opens the repository; data is not touched.
    #[command(group(ArgGroup::new("new").required(true).args(["new_password_file", "new_key_file"])))]
    Add {
        /// Repository URL.
        repo: String,
        /// File holding the new passphrase (its first line).
        #[arg(long)]
        new_password_file: Option<std::path::PathBuf>,
        /// File of at least 32 random bytes to open the repository with instead.
        #[arg(long)]
        new_key_file: Option<std::path::PathBuf>,
    },
    /// List the repository's keys.
    List {
        /// Repository URL.
        repo: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key (never the last one).
    Remove {
        /// Repository URL.
        repo: String,
        /// The key's id (from `key list`).
        id: String,
    },
}

/// How `snapsync daemon` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Logs on stderr, filtered by `SNAPSYNC_LOG`; by default warnings, and for the daemon
/// (whose log is its record of runs) information too.
fn init_logs(command: &Command) {
    let (default, format) = match command {
        Command::Daemon { log_format, .. } => ("info", *log_format),
        _ => ("warn", LogFormat::Text),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn main() -> ExitCode {
    allocator::tune();
    let cli = Cli::parse();
    init_logs(&cli.command);
    stores::set_secrets(cli.secrets);
    let result = match cli.command {
        Command::Init {
            repo,
            block_size,
            encryption,
        } => commands::init(&repo, block_size, encryption),
        Command::Key { action } => match action {
            KeyCommand::Add {
                repo,
                new_password_file,
                new_key_file,
            } => commands::key_add(&repo, new_password_file.as_deref(), new_key_file.as_deref()),
            KeyCommand::List { repo, json } => commands::key_list(&repo, json),
            KeyCommand::Remove { repo, id } => commands::key_remove(&repo, &id),
        },
        Command::List {
            store,
            client,
            json,
        } => commands::list(&client, &store, json),
        Command::Diff {
            store,
            client,
            target,
            base,
            json,
        } => commands::diff(&client, &store, &target, base.as_deref(), json),
        Command::Replicate {
            source,
            dest,
            client,
            volumes,
            snapshot,
            keep_checkpoints,
            json,
        } => commands::replicate(
            &client,
            &source,
            &dest,
            commands::Selection {
                volumes,
                snapshot,
                keep_checkpoints,
            },
            json,
        ),
        Command::Restore {
            store,
            client,
            target,
            output,
            format,
        } => commands::restore(&client, &store, &target, &output, format),
        Command::Verify {
            repo,
            read_data,
            json,
        } => commands::verify(&repo, read_data, json),
        Command::Prune {
            repo,
            options,
            json,
        } => commands::prune(&repo, &options, json),
        Command::Gc { repo, json } => commands::gc(&repo, json),
        Command::Serve {
            listen,
            stores,
            token_file,
            tls_cert,
            tls_key,
            insecure_plaintext,
        } => serve::run(serve::ServeArgs {
            listen,
            stores,
            token_file,
            tls_cert,
            tls_key,
            insecure_plaintext,
        }),
        Command::Export {
            store,
            client,
            target,
            listen,
            name,
            cache_size,
            tls_cert,
            tls_key,
            insecure_plaintext,
        } => export::run(export::ExportArgs {
            store,
            client,
            target,
            listen,
            name,
            cache_size,
            tls: tls_cert.zip(tls_key),
            insecure_plaintext,
        }),
        Command::Daemon { config, check, .. } => daemon::daemon(&config, check),
        Command::Status { config, json } => daemon::status(config.as_deref(), json),
        Command::RunJob { name, config, json } => daemon::run_job(&name, config.as_deref(), json),
        Command::Demo { dir, size_mib } => demo::run(dir.as_deref(), size_mib),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: what failed and why, outermost context first. Errors that
            // include their cause in their own message are not followed by it again.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !line.ends_with(&c) {
                    line.push_str(": ");
                    line.push_str(&c);
                }
            }
            if let Some(hint) = stores::hint(&e) {
                line.push_str(hint);
            }
            eprintln!("snapsync: error: {line}");
            // A mistake in the command line (a malformed URL or target, a missing
            // rule) is a usage error, as clap's own are.
            ExitCode::from(if is_usage(&e) { 2 } else { 1 })
        }
    }
}

/// Whether `e` is a mistake in the command line rather than a failure.
fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Usage>()
            || c.is::<snapsync::UrlError>()
            || matches!(
                c.downcast_ref::<snapsync::OpenError>(),
                Some(snapsync::OpenError::Url(_))
            )
    })
}
