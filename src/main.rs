//! `backup-provisioner`: thin entry point. Everything lives in the library.

use std::process::ExitCode;

use backup_provisioner::config::{Cli, Command, ConfigError, config_error_from_clap};
use backup_provisioner::startup::{self, StartupError};
use backup_provisioner::{auth, client, http, telemetry};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    backup_provisioner::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => match config_error_from_clap(&err) {
            Some(config) => {
                eprintln!("{config}");
                return ExitCode::from(2);
            }
            None => err.exit(),
        },
    };
    // The client prints its own answers; service logs would only mix into them.
    let command = match cli.command {
        Command::Client(args) => return ExitCode::from(client::run(*args).await),
        command => command,
    };
    telemetry::init_tracing(cli.log_json);
    match run(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartupError::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e @ StartupError::StaleSchema(_)) => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), StartupError> {
    match command {
        Command::Openapi => {
            print!("{}", http::openapi::spec_json());
            Ok(())
        }
        Command::Token(args) => {
            let token = auth::mint_hs256(
                &args.jwt_hs256_secret,
                &args.sub,
                &args.role,
                args.ttl,
                &args.jwt_audience,
            )
            .map_err(|e| ConfigError::new("BP_JWT_HS256_SECRET", e.to_string()))?;
            println!("{token}");
            Ok(())
        }
        Command::Migrate(args) => startup::migrate(&args).await,
        Command::Serve(args) => {
            let controller = Some(&args.controller);
            startup::run(&args.database, Some(&args.http), &args.worker, controller).await
        }
        Command::Worker(args) => startup::run(&args.database, None, &args.worker, None).await,
        Command::Controller(args) => startup::controller(&args).await,
        // Answered in main, before logging starts.
        Command::Client(_) => Ok(()),
    }
}
