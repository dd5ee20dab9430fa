//! Evaluation job rows and their results: lifecycle queued -> running -> succeeded | failed |
//! cancelled (the same statuses and guards as calibration jobs), progress, and one result row
//! per budget x method, written together with the job's success.

use serde::Serialize;
use sqlx::SqliteExecutor;

use crate::eval::{EvalReport, EvalRow, Method};

use super::jobs::{JobStatus, Progress};
use super::{Page, StoreError};

/// What an evaluation runs, as asked (after defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSettings {
    /// FLOPs budgets in request order (0 = unpruned).
    pub budgets: Vec<f64>,
    /// Deletion methods in report order.
    pub methods: Vec<Method>,
    /// The recipe each budget uses (`None` = unpruned), in `budgets` order.
    pub recipe_ids: Vec<Option<String>>,
    /// Most tokens per greedy answer.
    pub max_new_tokens: usize,
    /// Seed of the random baseline.
    pub seed: u64,
    /// Layer the FastV baseline deletes at.
    pub fastv_layer: usize,
}

/// One result: a method at a budget, with the id of the recipe used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationRow {
    /// The recipe's id (`None` = unpruned).
    pub recipe_id: Option<String>,
    /// The metrics (`recipe` is the recipe's name).
    #[serde(flatten)]
    pub metrics: EvalRow,
}

/// An evaluation job as stored and reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub id: String,
    pub status: JobStatus,
    pub model_fingerprint: String,
    pub name: Option<String>,
    #[serde(flatten)]
    pub settings: EvalSettings,
    /// Samples evaluated, and how many of them carry labels.
    pub samples: usize,
    pub labelled: usize,
    /// Mean visual tokens per sample, once succeeded.
    pub visual_tokens: Option<f64>,
    pub progress: Progress,
    pub error: Option<String>,
    /// Budget-major, then method in `methods` order; empty until succeeded.
    pub rows: Vec<EvaluationRow>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    status: JobStatus,
    model_fingerprint: String,
    name: Option<String>,
    budgets: String,
    methods: String,
    recipe_ids: String,
    samples: i64,
    labelled: i64,
    max_new_tokens: i64,
    seed: i64,
    fastv_layer: i64,
    visual_tokens: Option<f64>,
    progress_done: i64,
    progress_total: i64,
    phase: String,
    error: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ResultRow {
    budget: f64,
    method: String,
    recipe_id: Option<String>,
    recipe_name: Option<String>,
    accuracy: Option<f64>,
    agreement: f64,
    kl_mean: f64,
    top1_agreement: f64,
    flops_reduction: f64,
    visual_tokens_kept: f64,
    ttft_ms: f64,
}

fn method_named(name: &str) -> Option<Method> {
    [Method::Fitprune, Method::Random, Method::Fastv].into_iter().find(|m| m.name() == name)
}

impl JobRow {
    fn into_evaluation(self, results: Vec<ResultRow>) -> Result<Evaluation, StoreError> {
        let corrupt = |m: String| StoreError::Corrupt { id: self.id.clone(), message: m };
        let budgets = serde_json::from_str(&self.budgets).map_err(|e| corrupt(format!("budgets: {e}")))?;
        let names: Vec<String> = serde_json::from_str(&self.methods).map_err(|e| corrupt(format!("methods: {e}")))?;
        let methods = names
            .iter()
            .map(|n| method_named(n).ok_or_else(|| corrupt(format!("unknown method {n:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let recipe_ids = serde_json::from_str(&self.recipe_ids).map_err(|e| corrupt(format!("recipe_ids: {e}")))?;
        let mut rows = Vec::with_capacity(results.len());
        for r in results {
            let method = method_named(&r.method).ok_or_else(|| corrupt(format!("unknown method {:?}", r.method)))?;
            rows.push(EvaluationRow {
                recipe_id: r.recipe_id,
                metrics: EvalRow {
                    method,
                    budget: r.budget,
                    recipe: r.recipe_name,
                    accuracy: r.accuracy,
                    agreement: r.agreement,
                    kl_mean: r.kl_mean,
                    top1_agreement: r.top1_agreement,
                    flops_reduction: r.flops_reduction,
                    visual_tokens_kept: r.visual_tokens_kept,
                    ttft_ms: r.ttft_ms,
                },
            });
        }
        Ok(Evaluation {
            id: self.id,
            status: self.status,
            model_fingerprint: self.model_fingerprint,
            name: self.name,
            settings: EvalSettings {
                budgets,
                methods,
                recipe_ids,
                max_new_tokens: self.max_new_tokens as usize,
                seed: self.seed as u64,
                fastv_layer: self.fastv_layer as usize,
            },
            samples: self.samples as usize,
            labelled: self.labelled as usize,
            visual_tokens: self.visual_tokens,
            progress: Progress {
                done: self.progress_done as u64,
                total: self.progress_total as u64,
                phase: self.phase,
            },
            error: self.error,
            rows,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }
}

/// The table this module reads and writes.
const TABLE: &str = "evaluation_jobs";

const COLUMNS: &str = "id, status, model_fingerprint, name, budgets, methods, recipe_ids, samples, labelled, \
                       max_new_tokens, seed, fastv_layer, visual_tokens, progress_done, progress_total, phase, \
                       error, created_at, started_at, finished_at";

/// What a new evaluation needs.
#[derive(Debug, Clone)]
pub struct NewEvaluation<'a> {
    pub id: &'a str,
    pub model_fingerprint: &'a str,
    pub name: Option<&'a str>,
    pub settings: &'a EvalSettings,
    pub samples: usize,
    pub labelled: usize,
    pub created_at: &'a str,
}

/// Inserts a queued evaluation.
pub async fn create(db: impl SqliteExecutor<'_>, e: &NewEvaluation<'_>) -> Result<(), StoreError> {
    let s = e.settings;
    let methods: Vec<&str> = s.methods.iter().map(|m| m.name()).collect();
    sqlx::query(
        "INSERT INTO evaluation_jobs (id, status, model_fingerprint, name, budgets, methods, recipe_ids, samples, \
         labelled, max_new_tokens, seed, fastv_layer, created_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(e.id)
    .bind(e.model_fingerprint)
    .bind(e.name)
    .bind(serde_json::to_string(&s.budgets).unwrap_or_else(|_| "[]".into()))
    .bind(serde_json::to_string(&methods).unwrap_or_else(|_| "[]".into()))
    .bind(serde_json::to_string(&s.recipe_ids).unwrap_or_else(|_| "[]".into()))
    .bind(e.samples as i64)
    .bind(e.labelled as i64)
    .bind(s.max_new_tokens as i64)
    // The API caps seeds at i64::MAX, so the cast is lossless.
    .bind(s.seed as i64)
    .bind(s.fastv_layer as i64)
    .bind(e.created_at)
    .execute(db)
    .await?;
    Ok(())
}

async fn results(db: impl SqliteExecutor<'_>, id: &str) -> Result<Vec<ResultRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT budget, method, recipe_id, recipe_name, accuracy, agreement, kl_mean, top1_agreement, \
         flops_reduction, visual_tokens_kept, ttft_ms FROM evaluation_results WHERE job_id = ? ORDER BY position",
    )
    .bind(id)
    .fetch_all(db)
    .await?)
}

/// One evaluation by id, with its results.
pub async fn get(db: &sqlx::SqlitePool, id: &str) -> Result<Option<Evaluation>, StoreError> {
    let row: Option<JobRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM evaluation_jobs WHERE id = ?"))
        .bind(id)
        .fetch_optional(db)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let rows = results(db, &row.id).await?;
            row.into_evaluation(rows).map(Some)
        }
    }
}

/// A page of evaluations, newest first (ties by id), starting after the evaluation `after`.
pub async fn page(db: &sqlx::SqlitePool, after: Option<&str>, limit: usize) -> Result<Page<Evaluation>, StoreError> {
    let rows: Vec<JobRow> = super::newest_after(db, TABLE, COLUMNS, after, limit).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let r = results(db, &row.id).await?;
        out.push(row.into_evaluation(r)?);
    }
    Ok(Page::from_rows(out, limit))
}

/// queued -> running. `false` if the evaluation was no longer queued (e.g. cancelled meanwhile).
pub async fn start(db: impl SqliteExecutor<'_>, id: &str, at: &str) -> Result<bool, StoreError> {
    super::start_job(db, TABLE, id, at).await
}

/// Records progress of a running evaluation.
pub async fn progress(db: impl SqliteExecutor<'_>, id: &str, p: &Progress) -> Result<(), StoreError> {
    super::job_progress(db, TABLE, id, p).await
}

/// Moves a non-final evaluation to failed or cancelled. `false` if it was already final.
pub async fn finish(
    db: impl SqliteExecutor<'_>,
    id: &str,
    status: JobStatus,
    error: Option<&str>,
    at: &str,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE evaluation_jobs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status IN ('queued', 'running')",
    )
    .bind(status)
    .bind(error)
    .bind(at)
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// running -> succeeded with the report's rows (`row_recipes[i]` is row i's recipe id), all in
/// one transaction. `false` (nothing written) if the evaluation was no longer running.
pub async fn succeed(
    db: &sqlx::SqlitePool,
    id: &str,
    report: &EvalReport,
    row_recipes: &[Option<String>],
    at: &str,
) -> Result<bool, StoreError> {
    let mut tx = db.begin().await?;
    let r = sqlx::query(
        "UPDATE evaluation_jobs SET status = 'succeeded', visual_tokens = ?, labelled = ?, progress_done = ?, \
         progress_total = ?, finished_at = ? WHERE id = ? AND status = 'running'",
    )
    .bind(report.visual_tokens)
    .bind(report.labelled as i64)
    .bind(report.samples as i64)
    .bind(report.samples as i64)
    .bind(at)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    for (i, row) in report.rows.iter().enumerate() {
        let recipe_id = row_recipes.get(i).cloned().flatten();
        sqlx::query(
            "INSERT INTO evaluation_results (job_id, position, budget, method, recipe_id, recipe_name, accuracy, \
             agreement, kl_mean, top1_agreement, flops_reduction, visual_tokens_kept, ttft_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(i as i64)
        .bind(row.budget)
        .bind(row.method.name())
        .bind(recipe_id)
        .bind(&row.recipe)
        .bind(row.accuracy)
        .bind(row.agreement)
        .bind(row.kl_mean)
        .bind(row.top1_agreement)
        .bind(row.flops_reduction)
        .bind(row.visual_tokens_kept)
        .bind(row.ttft_ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// At start-up: evaluations a previous process left queued or running cannot resume (their
/// images lived in memory), so they become `failed` with a reason, as calibration jobs do.
pub async fn fail_interrupted(db: impl SqliteExecutor<'_>, at: &str) -> Result<u64, StoreError> {
    super::fail_interrupted_jobs(db, TABLE, at).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EvalSettings {
        EvalSettings {
            budgets: vec![0.0, 0.5],
            methods: vec![Method::Fitprune, Method::Fastv],
            recipe_ids: vec![None, Some("rcp_a".into())],
            max_new_tokens: 8,
            seed: i64::MAX as u64,
            fastv_layer: 1,
        }
    }

    fn new_eval<'a>(id: &'a str, s: &'a EvalSettings, at: &'a str) -> NewEvaluation<'a> {
        NewEvaluation { id, model_fingerprint: "m", name: None, settings: s, samples: 3, labelled: 2, created_at: at }
    }

    fn row(method: Method, budget: f64, accuracy: Option<f64>) -> EvalRow {
        EvalRow {
            method,
            budget,
            recipe: (budget > 0.0).then(|| "r".to_string()),
            accuracy,
            agreement: 1.0 - budget,
            kl_mean: budget / 10.0,
            top1_agreement: 1.0,
            flops_reduction: budget * 0.9,
            visual_tokens_kept: 36.0 * (1.0 - budget),
            ttft_ms: 2.5,
        }
    }

    #[sqlx::test]
    async fn lifecycle_rows_and_guards(pool: sqlx::SqlitePool) {
        let s = settings();
        create(&pool, &new_eval("e1", &s, "t0")).await.unwrap();
        let e = get(&pool, "e1").await.unwrap().unwrap();
        assert_eq!((e.status, &e.settings, e.rows.len()), (JobStatus::Queued, &s, 0));
        assert!(start(&pool, "e1", "t1").await.unwrap());
        assert!(!start(&pool, "e1", "t1").await.unwrap(), "only queued evaluations start");
        progress(&pool, "e1", &Progress { done: 1, total: 3, phase: "evaluating".into() }).await.unwrap();
        assert_eq!(get(&pool, "e1").await.unwrap().unwrap().progress.done, 1);
        let report = EvalReport {
            samples: 3,
            labelled: 2,
            visual_tokens: 36.0,
            rows: vec![
                row(Method::Fitprune, 0.0, Some(1.0)),
                row(Method::Fastv, 0.0, Some(1.0)),
                row(Method::Fitprune, 0.5, Some(0.5)),
                row(Method::Fastv, 0.5, None),
            ],
        };
        let recipes = [None, None, Some("rcp_a".to_string()), Some("rcp_a".to_string())];
        assert!(succeed(&pool, "e1", &report, &recipes, "t2").await.unwrap());
        assert!(!succeed(&pool, "e1", &report, &recipes, "t3").await.unwrap(), "final stays final");
        assert!(!finish(&pool, "e1", JobStatus::Cancelled, None, "t3").await.unwrap());
        let e = get(&pool, "e1").await.unwrap().unwrap();
        assert_eq!(
            (e.status, e.visual_tokens, e.finished_at.as_deref()),
            (JobStatus::Succeeded, Some(36.0), Some("t2"))
        );
        assert_eq!(e.progress.done, 3);
        let got: Vec<(EvalRow, Option<String>)> = e.rows.into_iter().map(|r| (r.metrics, r.recipe_id)).collect();
        let want: Vec<(EvalRow, Option<String>)> = report.rows.into_iter().zip(recipes).collect();
        assert_eq!(got, want);
        assert_eq!(e.settings.seed, i64::MAX as u64, "seeds survive the INTEGER column");
    }

    #[sqlx::test]
    async fn restart_fails_unfinished_evaluations_and_pages_follow_the_listing(pool: sqlx::SqlitePool) {
        let s = settings();
        for (id, at) in [("a", "t1"), ("b", "t3"), ("c", "t2"), ("d", "t3")] {
            create(&pool, &new_eval(id, &s, at)).await.unwrap();
        }
        start(&pool, "a", "t").await.unwrap();
        finish(&pool, "c", JobStatus::Cancelled, None, "t").await.unwrap();
        assert_eq!(fail_interrupted(&pool, "t9").await.unwrap(), 3);
        let a = get(&pool, "a").await.unwrap().unwrap();
        assert_eq!((a.status, a.error.as_deref()), (JobStatus::Failed, Some("interrupted by restart")));
        assert_eq!(get(&pool, "c").await.unwrap().unwrap().status, JobStatus::Cancelled);
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(&pool, after.as_deref(), 3).await.unwrap();
            seen.extend(p.data.iter().map(|e| e.id.clone()));
            if !p.has_more {
                break;
            }
            after = p.data.last().map(|e| e.id.clone());
        }
        assert_eq!(seen, ["b", "d", "c", "a"]);
        assert!(matches!(page(&pool, Some("zz"), 2).await, Err(StoreError::UnknownCursor(_))));
    }
}
