//! `snapsync`: replicate block-volume snapshots between storage systems, sending only
//! what changed.
//!
//! This binary is the thin edge: it parses arguments, opens stores from URLs, adapts
//! progress to a terminal and prints results. Everything else lives in the library
//! crates under `crates/`.

mod allocator;
mod commands;
mod demo;
mod progress;
mod serve;
mod stores;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Replicate block-volume snapshots between storage systems, sending only what changed.
#[derive(Debug, Parser)]
#[command(name = "snapsync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// PEM certificate(s) to trust for snapsync:// servers instead of the system roots:
    /// a server presenting one of them is trusted (pinned), as is one they sign (else
    /// SNAPSYNC_CA).
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    /// Bearer token file: the token for snapsync:// stores (else SNAPSYNC_TOKEN); for
    /// `serve`, the tokens it accepts.
    #[arg(long, global = true)]
    token_file: Option<std::path::PathBuf>,
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
    },
    /// List volumes and their snapshots.
    List {
        /// Store URL.
        store: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the changed extents between two snapshots.
    Diff {
        /// Store URL.
        store: String,
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
        /// Only these volumes (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Only this snapshot, instead of every one the destination lacks.
        #[arg(long)]
        snapshot: Option<String>,
        /// Print one JSON object per replicated snapshot.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot out as an image, identical to the snapshot.
    Restore {
        /// Store URL.
        store: String,
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
        /// Only these volumes (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Keep the N newest snapshots.
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest snapshot of each of the last N hours that have snapshots.
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        /// Same, per day.
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        /// Same, per ISO week.
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        /// Same, per month.
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        /// Also remove the newest snapshot a source replicates against (its next
        /// replication will be full).
        #[arg(long)]
        force: bool,
        /// Show what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
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
    Serve {
        /// Address to listen on, ADDR:PORT (port 0: any free port, printed when ready).
        #[arg(long)]
        listen: String,
        /// NAME=URL of a store to serve (repeatable).
        #[arg(long = "store", required = true)]
        stores: Vec<String>,
        /// TLS certificate chain (PEM).
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        /// TLS private key (PEM).
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
        /// Serve without TLS (clients then use snapsync+http://).
        #[arg(long)]
        insecure_plaintext: bool,
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

fn main() -> ExitCode {
    allocator::tune();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SNAPSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    stores::set_remote_args(stores::RemoteArgs {
        ca: cli.ca.clone(),
        token_file: cli.token_file.clone(),
    });
    let result = match cli.command {
        Command::Init { repo, block_size } => commands::init(&repo, block_size),
        Command::List { store, json } => commands::list(&store, json),
        Command::Diff {
            store,
            target,
            base,
            json,
        } => commands::diff(&store, &target, base.as_deref(), json),
        Command::Replicate {
            source,
            dest,
            volumes,
            snapshot,
            json,
        } => commands::replicate(&source, &dest, volumes, snapshot, json),
        Command::Restore {
            store,
            target,
            output,
            format,
        } => commands::restore(&store, &target, &output, format),
        Command::Verify {
            repo,
            read_data,
            json,
        } => commands::verify(&repo, read_data, json),
        Command::Prune {
            repo,
            volumes,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            force,
            dry_run,
            json,
        } => commands::prune(
            &repo,
            &volumes,
            &snapsync_core::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
            },
            force,
            dry_run,
            json,
        ),
        Command::Gc { repo, json } => commands::gc(&repo, json),
        Command::Serve {
            listen,
            stores,
            tls_cert,
            tls_key,
            insecure_plaintext,
        } => serve::run(serve::ServeArgs {
            listen,
            stores,
            token_file: cli.token_file,
            tls_cert,
            tls_key,
            insecure_plaintext,
        }),
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
            eprintln!("snapsync: error: {line}");
            ExitCode::from(1)
        }
    }
}
