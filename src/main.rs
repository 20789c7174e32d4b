//! `backup-provisioner`: thin entry point. Everything lives in the library.

use std::process::ExitCode;

use backup_provisioner::config::{Cli, Command, ConfigError, config_error_from_clap};
use backup_provisioner::startup::{Application, StartupError, shutdown_on_signals};
use backup_provisioner::{auth, db, http, provision, telemetry};
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
    telemetry::init_tracing(cli.log_json);
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartupError::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(2)
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
        Command::Migrate(args) => {
            let pool = db::connect(db::options(&args.database_url)?).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            args.http.check()?;
            args.worker.check()?;
            let database = db::options(&args.database.database_url)?;
            let registry = provision::registry(&args.worker).await?;
            let pool = db::connect(database).await?;
            let app = Application::build(pool, Some(&args.http), &args.worker, registry).await?;
            if let Some(addr) = app.local_addr() {
                tracing::info!(%addr, workers = args.worker.workers, "serving");
            }
            shutdown_on_signals(app.shutdown.clone());
            app.run_until_stopped().await
        }
        Command::Worker(args) => {
            args.worker.check()?;
            let database = db::options(&args.database.database_url)?;
            let registry = provision::registry(&args.worker).await?;
            let pool = db::connect(database).await?;
            let app = Application::build(pool, None, &args.worker, registry).await?;
            shutdown_on_signals(app.shutdown.clone());
            app.run_until_stopped().await
        }
    }
}
