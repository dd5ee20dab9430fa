//! SQLite persistence for recipes, calibration jobs and evaluation jobs (sqlx; migrations in
//! `migrations/`, embedded at build time and applied on open).

pub mod evaluations;
pub mod jobs;
pub mod recipes;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::SqliteExecutor;

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Default database: `fitprune.db` in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://fitprune.db";

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is malformed.
    #[error("database url {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    /// A page was asked to start after an id that is not in the listing.
    #[error("no row {0:?} to list after")]
    UnknownCursor(String),
    /// A stored row holds something that no longer parses.
    #[error("database row {id}: {message}")]
    Corrupt { id: String, message: String },
}

/// Opens (creating if missing) the database, with WAL, foreign keys and a busy timeout, and
/// applies pending migrations.
pub async fn open(url: &str) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|source| StoreError::Url { url: url.to_string(), source })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// One page of a keyset-paginated listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The rows, in listing order.
    pub data: Vec<T>,
    /// Whether rows follow the last one.
    pub has_more: bool,
}

impl<T> Page<T> {
    /// Splits `limit + 1` fetched rows into a page of `limit` and whether more follow.
    fn from_rows(mut data: Vec<T>, limit: usize) -> Self {
        let has_more = data.len() > limit;
        data.truncate(limit);
        Self { data, has_more }
    }
}

/// `limit + 1` rows of `table` (the `columns` given), newest first (ties by id), starting after the
/// row whose id is `after`: the keyset query job listings share. `table` and `columns` are this
/// module's constants, never request input.
async fn newest_after<R>(
    db: &SqlitePool,
    table: &str,
    columns: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<R>, StoreError>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let cursor: Option<(String, String)> = match after {
        None => None,
        Some(id) => Some(
            sqlx::query_as(&format!("SELECT created_at, id FROM {table} WHERE id = ?"))
                .bind(id)
                .fetch_optional(db)
                .await?
                .ok_or_else(|| StoreError::UnknownCursor(id.to_string()))?,
        ),
    };
    let order = "ORDER BY created_at DESC, id LIMIT ?";
    Ok(match cursor {
        None => {
            sqlx::query_as(&format!("SELECT {columns} FROM {table} {order}"))
                .bind(limit as i64 + 1)
                .fetch_all(db)
                .await?
        }
        Some((created, id)) => {
            sqlx::query_as(&format!(
                "SELECT {columns} FROM {table} WHERE created_at < ? OR (created_at = ? AND id > ?) {order}"
            ))
            .bind(&created)
            .bind(&created)
            .bind(id)
            .bind(limit as i64 + 1)
            .fetch_all(db)
            .await?
        }
    })
}

/// queued -> running for a row of a job `table` (calibration or evaluation jobs; this module's
/// constants, never request input). `false` if it was no longer queued (e.g. cancelled meanwhile).
async fn start_job(db: impl SqliteExecutor<'_>, table: &str, id: &str, at: &str) -> Result<bool, StoreError> {
    let r = sqlx::query(&format!(
        "UPDATE {table} SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'"
    ))
    .bind(at)
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Records the progress of a running row of a job `table`.
async fn job_progress(
    db: impl SqliteExecutor<'_>,
    table: &str,
    id: &str,
    p: &jobs::Progress,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE {table} SET progress_done = ?, progress_total = ?, phase = ? WHERE id = ? AND status = 'running'"
    ))
    .bind(p.done as i64)
    .bind(p.total as i64)
    .bind(&p.phase)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// At start-up, every queued or running row of a job `table` becomes `failed`, "interrupted by
/// restart": the count.
async fn fail_interrupted_jobs(db: impl SqliteExecutor<'_>, table: &str, at: &str) -> Result<u64, StoreError> {
    let r = sqlx::query(&format!(
        "UPDATE {table} SET status = 'failed', error = 'interrupted by restart', finished_at = ? \
         WHERE status IN ('queued', 'running')"
    ))
    .bind(at)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// The current UTC time as stored in rows and recipes (RFC 3339, milliseconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A fresh random id with a readable prefix (`rcp_…`, `job_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}
