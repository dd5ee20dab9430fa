//! Recipe rows: insert, list (optionally for one model), get, delete.

use sqlx::SqliteExecutor;

use super::{Page, StoreError};
use crate::pruning::Recipe;

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    name: String,
    model_fingerprint: String,
    budget: f64,
    achieved_reduction: f64,
    deletions: String,
    alpha: Option<f64>,
    visual_tokens: i64,
    samples: i64,
    created_at: String,
    job_id: Option<String>,
}

impl Row {
    fn into_recipe(self) -> Result<Recipe, StoreError> {
        let deletions = serde_json::from_str(&self.deletions)
            .map_err(|e| StoreError::Corrupt { id: self.id.clone(), message: format!("deletions: {e}") })?;
        Ok(Recipe {
            id: self.id,
            name: self.name,
            model_fingerprint: self.model_fingerprint,
            budget: self.budget,
            achieved_reduction: self.achieved_reduction,
            deletions,
            alpha: self.alpha,
            visual_tokens: self.visual_tokens as usize,
            samples: self.samples as usize,
            created_at: self.created_at,
            job_id: self.job_id,
        })
    }
}

const COLUMNS: &str = "id, name, model_fingerprint, budget, achieved_reduction, deletions, alpha, \
                       visual_tokens, samples, created_at, job_id";

/// Stores a recipe (its `id` must be set).
pub async fn insert(db: impl SqliteExecutor<'_>, r: &Recipe) -> Result<(), StoreError> {
    let deletions = serde_json::to_string(&r.deletions).unwrap_or_else(|_| "[]".into());
    sqlx::query(&format!("INSERT INTO recipes ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
        .bind(&r.id)
        .bind(&r.name)
        .bind(&r.model_fingerprint)
        .bind(r.budget)
        .bind(r.achieved_reduction)
        .bind(deletions)
        .bind(r.alpha)
        .bind(r.visual_tokens as i64)
        .bind(r.samples as i64)
        .bind(&r.created_at)
        .bind(&r.job_id)
        .execute(db)
        .await?;
    Ok(())
}

/// All recipes, or those of one model, ordered by model then budget.
pub async fn list(db: impl SqliteExecutor<'_>, model: Option<&str>) -> Result<Vec<Recipe>, StoreError> {
    let rows: Vec<Row> = match model {
        Some(fp) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM recipes WHERE model_fingerprint = ? ORDER BY budget, created_at, id"
            ))
            .bind(fp)
            .fetch_all(db)
            .await?
        }
        None => {
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM recipes ORDER BY model_fingerprint, budget, created_at, id"))
                .fetch_all(db)
                .await?
        }
    };
    rows.into_iter().map(Row::into_recipe).collect()
}

/// A page of recipes (all, or one model's) in the order of [`list`], starting after the recipe
/// `after` (keyset pagination: stable while rows are added or deleted elsewhere in the list).
pub async fn page(
    db: &sqlx::SqlitePool,
    model: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<Recipe>, StoreError> {
    // Sorted by model, budget, creation and id, the last making the order total.
    let cursor: Option<(String, f64, String, String)> = match after {
        None => None,
        Some(id) => Some(
            sqlx::query_as("SELECT model_fingerprint, budget, created_at, id FROM recipes WHERE id = ?")
                .bind(id)
                .fetch_optional(db)
                .await?
                .ok_or_else(|| StoreError::UnknownCursor(id.to_string()))?,
        ),
    };
    let mut sql = format!("SELECT {COLUMNS} FROM recipes WHERE 1 = 1");
    if model.is_some() {
        sql.push_str(" AND model_fingerprint = ?");
    }
    if cursor.is_some() {
        sql.push_str(" AND (model_fingerprint, budget, created_at, id) > (?, ?, ?, ?)");
    }
    sql.push_str(" ORDER BY model_fingerprint, budget, created_at, id LIMIT ?");
    let mut q = sqlx::query_as::<_, Row>(&sql);
    if let Some(fp) = model {
        q = q.bind(fp);
    }
    if let Some((fp, budget, created, id)) = cursor {
        q = q.bind(fp).bind(budget).bind(created).bind(id);
    }
    let rows = q.bind(limit as i64 + 1).fetch_all(db).await?;
    let recipes = rows.into_iter().map(Row::into_recipe).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(recipes, limit))
}

/// One recipe by id.
pub async fn get(db: impl SqliteExecutor<'_>, id: &str) -> Result<Option<Recipe>, StoreError> {
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM recipes WHERE id = ?")).bind(id).fetch_optional(db).await?;
    row.map(Row::into_recipe).transpose()
}

/// Deletes a recipe; `false` if there was none.
pub async fn delete(db: impl SqliteExecutor<'_>, id: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query("DELETE FROM recipes WHERE id = ?").bind(id).execute(db).await?.rows_affected() > 0)
}

/// Number of stored recipes.
pub async fn count(db: impl SqliteExecutor<'_>) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM recipes").fetch_one(db).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(id: &str, fp: &str, budget: f64) -> Recipe {
        Recipe {
            id: id.into(),
            name: format!("r{budget}"),
            model_fingerprint: fp.into(),
            budget,
            achieved_reduction: budget + 0.01,
            deletions: vec![1, 2, 3],
            alpha: Some(0.25),
            visual_tokens: 144,
            samples: 4,
            created_at: "2026-11-29T00:00:00Z".into(),
            job_id: None,
        }
    }

    #[tokio::test]
    async fn round_trip_filter_delete_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let pool = super::super::open(&url).await.unwrap();
        insert(&pool, &recipe("a", "m1", 0.5)).await.unwrap();
        insert(&pool, &recipe("b", "m1", 0.3)).await.unwrap();
        insert(&pool, &recipe("c", "m2", 0.7)).await.unwrap();
        assert!(insert(&pool, &recipe("a", "m1", 0.1)).await.is_err(), "duplicate id");
        let m1 = list(&pool, Some("m1")).await.unwrap();
        assert_eq!(m1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["b", "a"]);
        assert_eq!(list(&pool, None).await.unwrap().len(), 3);
        assert_eq!(get(&pool, "c").await.unwrap().unwrap(), recipe("c", "m2", 0.7));
        assert!(delete(&pool, "c").await.unwrap());
        assert!(!delete(&pool, "c").await.unwrap());
        pool.close().await;
        // Reopening applies no migration twice and keeps the rows.
        let pool = super::super::open(&url).await.unwrap();
        assert_eq!(count(&pool).await.unwrap(), 2);
    }

    #[sqlx::test]
    async fn check_constraints_reject_bad_rows(pool: sqlx::SqlitePool) {
        assert!(insert(&pool, &recipe("x", "m", 1.5)).await.is_err());
        let mut r = recipe("y", "m", 0.5);
        r.job_id = Some("no-such-job".into());
        assert!(insert(&pool, &r).await.is_err(), "foreign keys are on");
    }

    #[sqlx::test]
    async fn pages_cover_the_listing_once(pool: sqlx::SqlitePool) {
        for (id, fp, b) in [("a", "m1", 0.5), ("b", "m1", 0.3), ("c", "m2", 0.7), ("d", "m1", 0.3), ("e", "m2", 0.1)] {
            insert(&pool, &recipe(id, fp, b)).await.unwrap();
        }
        for model in [None, Some("m1")] {
            let all: Vec<String> = list(&pool, model).await.unwrap().into_iter().map(|r| r.id).collect();
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let p = page(&pool, model, after.as_deref(), 2).await.unwrap();
                seen.extend(p.data.iter().map(|r| r.id.clone()));
                if !p.has_more {
                    break;
                }
                after = p.data.last().map(|r| r.id.clone());
            }
            assert_eq!(seen, all, "{model:?}");
        }
        assert_eq!(page(&pool, Some("m2"), None, 10).await.unwrap().data.len(), 2);
        assert!(matches!(page(&pool, None, Some("nope"), 2).await, Err(StoreError::UnknownCursor(_))));
    }
}
