-- Evaluation jobs (POST /admin/evaluations) and their per-budget x method results.

CREATE TABLE evaluation_jobs (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model_fingerprint TEXT NOT NULL,
    name              TEXT,
    budgets           TEXT NOT NULL,               -- JSON array of floats (0 = unpruned)
    methods           TEXT NOT NULL,               -- JSON array of method names
    recipe_ids        TEXT NOT NULL DEFAULT '[]',  -- JSON array: the recipe of each budget (null = unpruned)
    samples           INTEGER NOT NULL,
    labelled          INTEGER NOT NULL,
    max_new_tokens    INTEGER NOT NULL,
    seed              INTEGER NOT NULL,
    fastv_layer       INTEGER NOT NULL,
    visual_tokens     REAL,                        -- mean visual tokens per sample, once finished
    progress_done     INTEGER NOT NULL DEFAULT 0,
    progress_total    INTEGER NOT NULL DEFAULT 0,
    phase             TEXT NOT NULL DEFAULT '',
    error             TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT
);

CREATE INDEX evaluation_jobs_by_status ON evaluation_jobs (status, created_at);

CREATE TABLE evaluation_results (
    job_id             TEXT NOT NULL REFERENCES evaluation_jobs (id) ON DELETE CASCADE,
    position           INTEGER NOT NULL,            -- report order: budget-major, then method
    budget             REAL NOT NULL,
    method             TEXT NOT NULL CHECK (method IN ('fitprune', 'random', 'fastv')),
    recipe_id          TEXT,                        -- no foreign key: the recipe may be deleted later
    recipe_name        TEXT,
    accuracy           REAL,                        -- NULL without labels
    agreement          REAL NOT NULL,
    kl_mean            REAL NOT NULL,
    top1_agreement     REAL NOT NULL,
    flops_reduction    REAL NOT NULL,
    visual_tokens_kept REAL NOT NULL,
    ttft_ms            REAL NOT NULL,
    PRIMARY KEY (job_id, position)
);
