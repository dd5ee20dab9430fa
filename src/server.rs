//! Server lifecycle: build the state (engine thread loading the model in the background, so
//! `/health` answers 503 meanwhile), listen, and shut down gracefully on SIGINT/SIGTERM — stop
//! accepting, let in-flight requests finish for `--shutdown-timeout`, then cancel the rest.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::admin::AdminState;
use crate::api::{build_app, ApiSettings, AppState};
use crate::config::ServerConfig;
use crate::engine::recipes::{FileRecipes, RecipeSource};
use crate::engine::{Engine, EngineState, LoadedModel};
use crate::jobs::calibration::CalibrationJobs;
use crate::jobs::evaluation::EvaluationJobs;
use crate::jobs::recipe_source::DbRecipes;
use crate::metrics::Metrics;
use crate::model::llava::LoadOptions;
use crate::model::{source, LlavaModel};
use crate::store;
use crate::validation::images::ImageFetcher;
use crate::validation::ValidationSettings;

/// Builds the application state: opens the store (failing jobs a previous process left
/// unfinished), starts the engine thread (which loads the model) and the calibration and
/// evaluation threads.
pub async fn start(cfg: &ServerConfig) -> anyhow::Result<(AppState, JoinHandle<()>, Arc<FileRecipes>)> {
    let metrics = Metrics::new()?;
    let recipes = Arc::new(match &cfg.recipes {
        Some(path) => FileRecipes::load(path)?,
        None => FileRecipes::empty(),
    });
    let (model, name, device_label) = (cfg.model.clone(), cfg.served_model_name.clone(), cfg.device_label.clone());
    let options = LoadOptions { device: cfg.device.clone(), dtype: cfg.dtype, pad_to_square: cfg.pad_to_square };
    let loader = Box::new(move || {
        let src = source::resolve(model.as_deref())?;
        if src.is_demo {
            warn!(dir = %src.dir.display(), "no --model given: serving the built-in demo model (RANDOM WEIGHTS, answers are noise)");
        }
        let loaded = LlavaModel::load(&src.dir, options)?;
        LoadedModel::new(loaded, name, src.is_demo, device_label)
    });
    let (engine, worker) = Engine::start(loader, cfg.engine.clone(), metrics.clone())?;
    let fetcher = ImageFetcher::new(cfg.images.clone()).context("building the image fetcher")?;
    let settings = ApiSettings {
        validation: ValidationSettings {
            served_model_name: cfg.served_model_name.clone(),
            images: cfg.images.clone(),
            default_budget: cfg.default_budget,
            detail_low_budget: cfg.detail_low_budget,
        },
        api_key: cfg.api_key.clone(),
        max_body_bytes: cfg.max_body_bytes,
        started: chrono::Utc::now().timestamp(),
    };
    let pool = store::open(&cfg.database_url).await.with_context(|| format!("opening {}", cfg.database_url))?;
    let now = store::now();
    let interrupted = store::jobs::fail_interrupted(&pool, &now).await?;
    if interrupted > 0 {
        warn!(jobs = interrupted, "calibration jobs left unfinished by a previous process were marked failed");
        // Counted like any other failure, so the calibration-failed alert fires for them.
        metrics.calibration_jobs.with_label_values(&["failed"]).inc_by(interrupted);
    }
    let interrupted = store::evaluations::fail_interrupted(&pool, &now).await?;
    if interrupted > 0 {
        warn!(jobs = interrupted, "evaluation jobs left unfinished by a previous process were marked failed");
        metrics.evaluation_jobs.with_label_values(&["failed"]).inc_by(interrupted);
    }
    metrics.recipes_stored.set(store::recipes::count(&pool).await?);
    let db = Arc::new(DbRecipes::new(pool.clone()).with_file(recipes.clone()));
    let evaluations = EvaluationJobs::start(pool.clone(), engine.clone(), metrics.clone())?;
    let jobs = CalibrationJobs::start(pool, engine.clone(), db.clone(), metrics.clone(), cfg.calibration_cache_bytes)?;
    let admin = AdminState {
        token: cfg.admin_token.clone(),
        recipes: db.clone(),
        jobs,
        evaluations,
        data_root: cfg.calibration_data_root.clone(),
    };
    let source: Arc<dyn RecipeSource> = db;
    let state = AppState {
        engine,
        metrics,
        recipes: source,
        fetcher,
        settings: Arc::new(settings),
        admin: Some(Arc::new(admin)),
    };
    Ok((state, worker, recipes))
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let (state, worker, recipes) = start(&cfg).await?;
    let listener = TcpListener::bind(cfg.addr).await.with_context(|| format!("binding {}", cfg.addr))?;
    let shutdown = shutdown_signal();
    info!(addr = %listener.local_addr()?, model = %cfg.served_model_name, "listening");
    tokio::spawn(log_recipes_when_loaded(state.engine.clone(), recipes));
    serve(listener, state, worker, shutdown, cfg.shutdown_timeout).await
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
/// `grace`, cancels whatever still runs, joins the engine thread, and last closes the database
/// pool — after everything that writes to it has stopped — so SQLite checkpoints its WAL and
/// removes the `-wal` and `-shm` files.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    worker: JoinHandle<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let engine = state.engine.clone();
    let jobs = state.admin.as_ref().map(|a| (a.jobs.clone(), a.evaluations.clone()));
    let pool = state.admin.as_ref().map(|a| a.recipes.pool().clone());
    let (signalled_tx, mut signalled_rx) = tokio::sync::watch::channel(false);
    let drain_engine = engine.clone();
    let server = axum::serve(listener, build_app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        info!("shutting down: no new requests; finishing in-flight ones");
        drain_engine.begin_drain();
        let _ = signalled_tx.send(true);
    });
    let cancel_engine = engine.clone();
    let deadline = async move {
        let _ = signalled_rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
        warn!(?grace, "shutdown timeout: cancelling requests still running");
        cancel_engine.shutdown();
        // Give cancelled streams a moment to send their error event and close.
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        result = server.into_future() => result.context("serving")?,
        _ = deadline => warn!("connections still open after the shutdown timeout; exiting"),
    }
    engine.shutdown();
    drop(engine);
    let joined = tokio::task::spawn_blocking(move || worker.join()).await;
    // The engine no longer runs layer evaluations, so a job in flight ends now; wait until its
    // end is recorded, then close the pool.
    if let Some((calibrations, evaluations)) = jobs {
        tokio::task::spawn_blocking(move || {
            calibrations.stop_and_join();
            evaluations.stop_and_join();
        })
        .await?;
    }
    // Closed even if the engine thread panicked: a clean database matters more than the order
    // of error reports.
    if let Some(pool) = pool {
        pool.close().await;
    }
    joined?.map_err(|_| anyhow::anyhow!("engine thread panicked"))?;
    info!("stopped");
    Ok(())
}

/// Logs which recipes apply once the model is loaded (and why others do not).
async fn log_recipes_when_loaded(engine: Engine, recipes: Arc<FileRecipes>) {
    loop {
        match engine.state() {
            EngineState::Ready(loaded) => {
                let (ok, skipped) = recipes.resolve(&loaded.info);
                let ids: Vec<&str> = ok.iter().map(|r| r.id.as_str()).collect();
                info!(fingerprint = %loaded.info.fingerprint, recipes = ?ids, "model ready");
                for why in skipped {
                    warn!(%why, "recipe skipped");
                }
                return;
            }
            EngineState::Loading => tokio::time::sleep(Duration::from_millis(200)).await,
            EngineState::Failed(_) | EngineState::Stopped => return,
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves on either.
/// They must be in place before the server logs "listening": a handler registered only when
/// the future is first polled leaves a window in which a supervisor's SIGTERM, sent as soon as
/// the server is up, kills the process without closing the database.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, signal = name, "cannot listen for the signal");
                None
            }
        };
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            tokio::select! {
                _ = recv(int.as_mut()) => {},
                _ = recv(term.as_mut()) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

/// The next delivery of `signal`; never, without one.
#[cfg(unix)]
async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
