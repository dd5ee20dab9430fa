//! The thread-and-channel shape every job runner shares: requests go to one runner thread in
//! order, each with a cancel flag the API can raise while it is queued or running, and shutdown
//! closes the channel, raises every flag and waits for the job in flight to record its end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::warn;

/// A job request the runner identifies by its id (its row in the store).
pub trait JobRequest: Send + 'static {
    /// The job's id.
    fn job_id(&self) -> &str;
}

/// Cancel flags of the jobs handed to a runner and not yet finished.
#[derive(Clone, Default)]
pub struct CancelFlags(Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>);

impl CancelFlags {
    /// Job `id`'s flag (a fresh, lowered one if the job is unknown).
    pub fn flag(&self, id: &str) -> Arc<AtomicBool> {
        self.0.lock().ok().and_then(|c| c.get(id).cloned()).unwrap_or_default()
    }

    /// Forgets a finished job.
    pub fn remove(&self, id: &str) {
        if let Ok(mut c) = self.0.lock() {
            c.remove(id);
        }
    }

    fn insert(&self, id: &str) {
        if let Ok(mut c) = self.0.lock() {
            c.insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        }
    }

    fn raise(&self, id: &str) {
        if let Ok(c) = self.0.lock() {
            if let Some(flag) = c.get(id) {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }

    fn raise_all(&self) {
        if let Ok(c) = self.0.lock() {
            c.values().for_each(|flag| flag.store(true, Ordering::SeqCst));
        }
    }
}

/// Handle to a runner thread that takes requests of type `R` one at a time.
pub struct JobQueue<R> {
    kind: &'static str,
    tx: Arc<Mutex<Option<Sender<R>>>>,
    cancels: CancelFlags,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl<R> Clone for JobQueue<R> {
    fn clone(&self) -> Self {
        Self { kind: self.kind, tx: self.tx.clone(), cancels: self.cancels.clone(), thread: self.thread.clone() }
    }
}

impl<R: JobRequest> JobQueue<R> {
    /// Starts the thread `fitprune-{kind}`, which runs `run` over the requests and their flags.
    pub fn spawn(
        kind: &'static str,
        run: impl FnOnce(Receiver<R>, CancelFlags) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel();
        let cancels = CancelFlags::default();
        let flags = cancels.clone();
        let handle = std::thread::Builder::new().name(format!("fitprune-{kind}")).spawn(move || run(rx, flags))?;
        Ok(Self { kind, tx: Arc::new(Mutex::new(Some(tx))), cancels, thread: Arc::new(Mutex::new(Some(handle))) })
    }

    /// Queues a job whose row was created as `queued`; `false` once the runner has stopped.
    pub fn submit(&self, req: R) -> bool {
        self.cancels.insert(req.job_id());
        match self.tx.lock() {
            Ok(tx) => tx.as_ref().is_some_and(|tx| tx.send(req).is_ok()),
            Err(_) => false,
        }
    }

    /// Stops taking jobs and waits (blocking) until the runner has recorded the end of the job
    /// in flight. Call after the engine has stopped, so that job ends at its next engine call;
    /// queued jobs that never started stay `queued` and are failed at the next start.
    pub fn stop_and_join(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        self.cancels.raise_all();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            if handle.join().is_err() {
                warn!(kind = self.kind, "a job runner thread panicked");
            }
        }
    }

    /// Asks a queued or running job to stop (at its next check).
    pub fn cancel(&self, job_id: &str) {
        self.cancels.raise(job_id);
    }
}
