//! Whether the worker is really consuming: readiness means every queue's last fetch succeeded,
//! not merely that the process is up (n8n #37581: workers idle for hours behind green health
//! checks after a network flap).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Per-queue consumption state, shared with the health endpoint. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    queues: Arc<Mutex<HashMap<String, bool>>>,
}

impl Health {
    pub(crate) fn consumed(&self, queue: &str) {
        self.queues.lock().unwrap().insert(queue.to_owned(), true);
    }

    pub(crate) fn failed(&self, queue: &str) {
        self.queues.lock().unwrap().insert(queue.to_owned(), false);
    }

    /// `Ok` when every queue has been fetched from successfully and the last fetch of each
    /// succeeded; otherwise the queues that are not being consumed.
    pub fn ready(&self, queues: &[String]) -> Result<(), Vec<String>> {
        let state = self.queues.lock().unwrap();
        let failing: Vec<String> = queues
            .iter()
            .filter(|q| state.get(*q) != Some(&true))
            .cloned()
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }
}
