//! Calibration job rows: lifecycle queued -> running -> succeeded | failed | cancelled, with
//! progress, timings, the recipes a job produced, and recovery after a restart.

use serde::Serialize;
use sqlx::SqliteExecutor;

use super::{Page, StoreError};

/// A job's status; stored as its snake_case name (the column's CHECK lists the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for the engine.
    Queued,
    /// Being calibrated.
    Running,
    /// Finished; recipes stored.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped on request; nothing stored.
    Cancelled,
}

impl JobStatus {
    /// The name (metric label, column value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A calibration job as stored and reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    pub model_fingerprint: String,
    pub name: Option<String>,
    pub budgets: Vec<f64>,
    pub tolerance: f64,
    pub samples: usize,
    pub progress: Progress,
    pub error: Option<String>,
    pub recipe_ids: Vec<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// How far a job has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub phase: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    status: JobStatus,
    model_fingerprint: String,
    name: Option<String>,
    budgets: String,
    tolerance: f64,
    samples: i64,
    progress_done: i64,
    progress_total: i64,
    phase: String,
    error: Option<String>,
    recipe_ids: String,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl Row {
    fn into_job(self) -> Result<Job, StoreError> {
        let corrupt = |m: String| StoreError::Corrupt { id: self.id.clone(), message: m };
        let budgets = serde_json::from_str(&self.budgets).map_err(|e| corrupt(format!("budgets: {e}")))?;
        let recipe_ids = serde_json::from_str(&self.recipe_ids).map_err(|e| corrupt(format!("recipe_ids: {e}")))?;
        Ok(Job {
            id: self.id,
            status: self.status,
            model_fingerprint: self.model_fingerprint,
            name: self.name,
            budgets,
            tolerance: self.tolerance,
            samples: self.samples as usize,
            progress: Progress {
                done: self.progress_done as u64,
                total: self.progress_total as u64,
                phase: self.phase,
            },
            error: self.error,
            recipe_ids,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }
}

/// The table this module reads and writes.
const TABLE: &str = "calibration_jobs";

const COLUMNS: &str = "id, status, model_fingerprint, name, budgets, tolerance, samples, progress_done, \
                       progress_total, phase, error, recipe_ids, created_at, started_at, finished_at";

/// What a new job needs.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub model_fingerprint: &'a str,
    pub name: Option<&'a str>,
    pub budgets: &'a [f64],
    pub tolerance: f64,
    pub samples: usize,
    pub created_at: &'a str,
}

/// Inserts a queued job.
pub async fn create(db: impl SqliteExecutor<'_>, j: &NewJob<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO calibration_jobs (id, status, model_fingerprint, name, budgets, tolerance, samples, created_at) \
         VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
    )
    .bind(j.id)
    .bind(j.model_fingerprint)
    .bind(j.name)
    .bind(serde_json::to_string(j.budgets).unwrap_or_else(|_| "[]".into()))
    .bind(j.tolerance)
    .bind(j.samples as i64)
    .bind(j.created_at)
    .execute(db)
    .await?;
    Ok(())
}

/// One job by id.
pub async fn get(db: impl SqliteExecutor<'_>, id: &str) -> Result<Option<Job>, StoreError> {
    let row: Option<Row> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM calibration_jobs WHERE id = ?"))
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.map(Row::into_job).transpose()
}

/// All jobs, newest first.
pub async fn list(db: impl SqliteExecutor<'_>) -> Result<Vec<Job>, StoreError> {
    let rows: Vec<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM calibration_jobs ORDER BY created_at DESC, id"))
            .fetch_all(db)
            .await?;
    rows.into_iter().map(Row::into_job).collect()
}

/// A page of jobs, newest first like [`list`], starting after the job `after`.
pub async fn page(db: &sqlx::SqlitePool, after: Option<&str>, limit: usize) -> Result<Page<Job>, StoreError> {
    let rows: Vec<Row> = super::newest_after(db, TABLE, COLUMNS, after, limit).await?;
    let jobs = rows.into_iter().map(Row::into_job).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(jobs, limit))
}

/// queued -> running. `false` if the job was no longer queued (e.g. cancelled meanwhile).
pub async fn start(db: impl SqliteExecutor<'_>, id: &str, at: &str) -> Result<bool, StoreError> {
    super::start_job(db, TABLE, id, at).await
}

/// Records progress of a running job.
pub async fn progress(db: impl SqliteExecutor<'_>, id: &str, p: &Progress) -> Result<(), StoreError> {
    super::job_progress(db, TABLE, id, p).await
}

/// Moves a non-final job to a final status. `false` if it was already final.
pub async fn finish(
    db: impl SqliteExecutor<'_>,
    id: &str,
    status: JobStatus,
    error: Option<&str>,
    recipe_ids: &[String],
    at: &str,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE calibration_jobs SET status = ?, error = ?, recipe_ids = ?, finished_at = ? \
         WHERE id = ? AND status IN ('queued', 'running')",
    )
    .bind(status)
    .bind(error)
    .bind(serde_json::to_string(recipe_ids).unwrap_or_else(|_| "[]".into()))
    .bind(at)
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// At start-up: jobs left `running` by a previous process cannot resume (their samples and state
/// lived in memory), so they become `failed` with a reason. Queued jobs stay queued only if the
/// caller still has their samples; the server, which does not, fails those too.
pub async fn fail_interrupted(db: impl SqliteExecutor<'_>, at: &str) -> Result<u64, StoreError> {
    super::fail_interrupted_jobs(db, TABLE, at).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(id: &str) -> NewJob<'_> {
        NewJob {
            id,
            model_fingerprint: "m",
            name: Some("n"),
            budgets: &[0.3, 0.5],
            tolerance: 0.01,
            samples: 4,
            created_at: "t0",
        }
    }

    // `#[sqlx::test]`: a fresh database per test under target/sqlx (no DATABASE_URL needed for
    // SQLite) with the embedded migrations applied.
    #[sqlx::test]
    async fn lifecycle_and_guards(pool: sqlx::SqlitePool) {
        create(&pool, &new_job("j1")).await.unwrap();
        let j = get(&pool, "j1").await.unwrap().unwrap();
        assert_eq!((j.status, j.budgets.clone(), j.samples), (JobStatus::Queued, vec![0.3, 0.5], 4));
        assert!(start(&pool, "j1", "t1").await.unwrap());
        assert!(!start(&pool, "j1", "t1").await.unwrap(), "only queued jobs start");
        progress(&pool, "j1", &Progress { done: 3, total: 15, phase: "statistics".into() }).await.unwrap();
        assert_eq!(get(&pool, "j1").await.unwrap().unwrap().progress.done, 3);
        assert!(finish(&pool, "j1", JobStatus::Succeeded, None, &["r1".into()], "t2").await.unwrap());
        assert!(!finish(&pool, "j1", JobStatus::Cancelled, None, &[], "t3").await.unwrap(), "final stays final");
        let j = get(&pool, "j1").await.unwrap().unwrap();
        assert_eq!(
            (j.status, j.recipe_ids, j.finished_at.as_deref()),
            (JobStatus::Succeeded, vec!["r1".to_string()], Some("t2"))
        );
    }

    #[sqlx::test]
    async fn restart_fails_unfinished_jobs(pool: sqlx::SqlitePool) {
        create(&pool, &new_job("a")).await.unwrap();
        create(&pool, &new_job("b")).await.unwrap();
        create(&pool, &new_job("c")).await.unwrap();
        start(&pool, "a", "t").await.unwrap();
        finish(&pool, "c", JobStatus::Cancelled, None, &[], "t").await.unwrap();
        assert_eq!(fail_interrupted(&pool, "t9").await.unwrap(), 2);
        let a = get(&pool, "a").await.unwrap().unwrap();
        assert_eq!((a.status, a.error.as_deref()), (JobStatus::Failed, Some("interrupted by restart")));
        assert_eq!(get(&pool, "c").await.unwrap().unwrap().status, JobStatus::Cancelled);
        assert_eq!(list(&pool).await.unwrap().len(), 3);
    }

    #[sqlx::test]
    async fn pages_follow_the_listing_order_without_gaps(pool: sqlx::SqlitePool) {
        // Five jobs, two sharing a creation time (the id breaks the tie).
        for (id, at) in [("a", "t1"), ("b", "t3"), ("c", "t2"), ("d", "t3"), ("e", "t0")] {
            create(&pool, &NewJob { created_at: at, ..new_job(id) }).await.unwrap();
        }
        let all: Vec<String> = list(&pool).await.unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(all, ["b", "d", "c", "a", "e"]);
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(&pool, after.as_deref(), 2).await.unwrap();
            assert!(p.data.len() <= 2);
            seen.extend(p.data.iter().map(|j| j.id.clone()));
            if !p.has_more {
                break;
            }
            after = p.data.last().map(|j| j.id.clone());
        }
        assert_eq!(seen, all);
        let p = page(&pool, Some("a"), 10).await.unwrap();
        assert_eq!((p.data.len(), p.has_more), (1, false));
        assert!(matches!(page(&pool, Some("zz"), 2).await, Err(StoreError::UnknownCursor(_))));
    }

    #[sqlx::test]
    async fn a_status_outside_the_enum_is_an_error_not_a_panic(pool: sqlx::SqlitePool) {
        create(&pool, &new_job("j")).await.unwrap();
        // The CHECK constraint keeps bad names out; drop it to simulate a hand-edited row.
        // (A pragma holds per connection, so one connection does both.)
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("PRAGMA ignore_check_constraints = ON").execute(&mut *conn).await.unwrap();
        sqlx::query("UPDATE calibration_jobs SET status = 'paused' WHERE id = 'j'").execute(&mut *conn).await.unwrap();
        assert!(get(&mut *conn, "j").await.is_err());
    }
}
