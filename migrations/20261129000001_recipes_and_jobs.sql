-- Pruning recipes and the calibration jobs that fit them.

CREATE TABLE calibration_jobs (
    id              TEXT PRIMARY KEY,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model_fingerprint TEXT NOT NULL,
    name            TEXT,
    budgets         TEXT NOT NULL,               -- JSON array of floats
    tolerance       REAL NOT NULL,
    samples         INTEGER NOT NULL,
    progress_done   INTEGER NOT NULL DEFAULT 0,
    progress_total  INTEGER NOT NULL DEFAULT 0,
    phase           TEXT NOT NULL DEFAULT '',
    error           TEXT,
    recipe_ids      TEXT NOT NULL DEFAULT '[]',  -- JSON array of recipe ids
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT
);

CREATE INDEX calibration_jobs_by_status ON calibration_jobs (status, created_at);

CREATE TABLE recipes (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    model_fingerprint   TEXT NOT NULL,
    budget              REAL NOT NULL CHECK (budget >= 0 AND budget < 1),
    achieved_reduction  REAL NOT NULL,
    deletions           TEXT NOT NULL,           -- JSON array of per-layer counts
    alpha               REAL,
    visual_tokens       INTEGER NOT NULL CHECK (visual_tokens > 0),
    samples             INTEGER NOT NULL,
    created_at          TEXT NOT NULL,
    job_id              TEXT REFERENCES calibration_jobs (id) ON DELETE SET NULL
);

CREATE INDEX recipes_by_model_budget ON recipes (model_fingerprint, budget);
