//! What became of each task that `submit --batch` and `submit --stream` sent: one
//! outcome per task, its words on a line, and the counts for the summary.

use mesh_core::api::BatchItemReply;
use mesh_core::TaskId;
use serde::Serialize;

/// What became of one task sent for submission.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub(super) struct Submitted {
    /// The task id, once submitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
    /// True when its idempotency key matched an earlier submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<bool>,
    /// Why it was not submitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Submitted {
    /// Not submitted, and why.
    pub fn refused(why: String) -> Submitted {
        Submitted {
            error: Some(why),
            ..Submitted::default()
        }
    }

    /// The node's answer for the task.
    pub fn answered(reply: BatchItemReply) -> Submitted {
        match reply {
            BatchItemReply::Submitted(r) => Submitted {
                task: Some(r.task),
                existing: Some(r.existing),
                error: None,
            },
            BatchItemReply::Refused { error } => Submitted::refused(error),
        }
    }

    /// `task 7 submitted`, `task 7 already exists (same idempotency key)` or
    /// `not submitted: WHY`.
    pub fn describe(&self) -> String {
        match (&self.error, self.task, self.existing) {
            (Some(why), _, _) => format!("not submitted: {why}"),
            (None, Some(id), Some(true)) => {
                format!("task {id} already exists (same idempotency key)")
            }
            (None, Some(id), _) => format!("task {id} submitted"),
            (None, None, _) => "not submitted".into(),
        }
    }
}

/// Counts of outcomes, for the summary line and the exit status.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Outcomes counted.
    pub total: usize,
    /// Submitted, new or existing.
    pub submitted: usize,
    /// Of those, the ones whose idempotency key matched an earlier submission.
    pub existing: usize,
    /// Not submitted, with a reason.
    pub refused: usize,
}

impl Tally {
    /// Count one more outcome.
    pub fn add(&mut self, s: &Submitted) {
        self.total += 1;
        self.submitted += usize::from(s.task.is_some());
        self.existing += usize::from(s.existing == Some(true));
        self.refused += usize::from(s.error.is_some());
    }

    /// `20 task(s): 19 submitted (1 already existed), 1 not submitted`, with `what`
    /// naming the things counted (`task(s)`, `line(s)`).
    pub fn summary(&self, what: &str) -> String {
        let mut text = format!("{} {what}: {} submitted", self.total, self.submitted);
        if self.existing > 0 {
            text.push_str(&format!(" ({} already existed)", self.existing));
        }
        if self.refused > 0 {
            text.push_str(&format!(", {} not submitted", self.refused));
        }
        text.push('\n');
        text
    }
}
