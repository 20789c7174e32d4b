//! `kube-emulator`: serves the in-memory Kubernetes API emulator over plain HTTP.
//!
//! Prints the bound address (`127.0.0.1:PORT`) on stdout, then serves until SIGINT/SIGTERM.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Parser;
use kube_emulator::Emulator;

#[derive(Debug, Parser)]
#[command(name = "kube-emulator", version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,

    /// Namespace to create at start (repeatable). `default` always exists.
    #[arg(long = "namespace", value_name = "NAME")]
    namespaces: Vec<String>,

    /// Require this bearer token (full access).
    #[arg(long, env = "KUBE_EMULATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Write a kubeconfig for the emulator (with `--token` as the user's token) to this path.
    #[arg(long, value_name = "PATH")]
    kubeconfig_out: Option<PathBuf>,
}

fn write_private(path: &PathBuf, contents: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let emulator = Emulator::new();
    for ns in &args.namespaces {
        emulator
            .create_namespace(ns)
            .map_err(|e| format!("--namespace {ns}: {}", e.message))?;
    }
    if let Some(token) = &args.token {
        emulator.add_token(token);
    }

    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.kubeconfig_out {
        let namespace = args
            .namespaces
            .first()
            .map(String::as_str)
            .unwrap_or("default");
        let config =
            kube_emulator::kubeconfig(&format!("http://{addr}"), args.token.as_deref(), namespace);
        write_private(path, &config)?;
    }
    println!("{addr}");
    std::io::stdout().flush()?;

    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    };
    kube_emulator::serve_with_shutdown(listener, emulator, shutdown).await?;
    Ok(())
}
