//! Exit statuses (`mesh_core::api::EXIT_*`) and the errors that choose one other than 1.

use mesh_core::api::{EXIT_ERROR, EXIT_TASK_FAILED, EXIT_USAGE};

/// An error whose exit status is not the plain "error" (1).
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// The node called the command line malformed (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A waited-for task ended failed or cancelled (exit 3). Its view is already on
    /// stdout, so no `{"error": ..}` document is printed for it.
    #[error("{0}")]
    TaskFailed(String),
    /// Some tasks of a batch were not submitted (exit 1). The batch's answer, with the
    /// error of each, is already on stdout.
    #[error("{0}")]
    BatchIncomplete(String),
}

/// The exit status for an error.
pub fn exit_status_of(err: &anyhow::Error) -> u32 {
    match err.downcast_ref::<ExitError>() {
        Some(ExitError::Usage(_)) => EXIT_USAGE,
        Some(ExitError::TaskFailed(_)) => EXIT_TASK_FAILED,
        Some(ExitError::BatchIncomplete(_)) | None => EXIT_ERROR,
    }
}

/// True when stdout already holds the command's JSON document.
pub fn reported_on_stdout(err: &anyhow::Error) -> bool {
    matches!(
        err.downcast_ref::<ExitError>(),
        Some(ExitError::TaskFailed(_) | ExitError::BatchIncomplete(_))
    )
}

/// An error message on one line, as the exit-status contract promises: multi-line
/// causes (naga diagnostics, TOML snippets) are joined with " | ".
pub fn one_line(message: &str) -> String {
    // Diagnostic frames (`│`, `┌─`) carry no words; drop the lines made only of them.
    let frame_only = |l: &str| {
        l.chars()
            .all(|c| matches!(c, '│' | '|' | '┌' | '─' | '^' | ' '))
    };
    message
        .lines()
        .map(str::trim)
        .filter(|l| !frame_only(l))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_lines() {
        assert_eq!(exit_status_of(&anyhow::anyhow!("x")), 1);
        assert_eq!(exit_status_of(&ExitError::Usage("u".into()).into()), 2);
        let failed: anyhow::Error = ExitError::TaskFailed("t".into()).into();
        assert_eq!(exit_status_of(&failed), 3);
        assert!(reported_on_stdout(&failed));
        let incomplete: anyhow::Error = ExitError::BatchIncomplete("b".into()).into();
        assert_eq!(exit_status_of(&incomplete), 1);
        assert!(reported_on_stdout(&incomplete));
        assert!(!reported_on_stdout(&anyhow::anyhow!("x")));
        assert_eq!(one_line("a:\n  b\n\n c \n"), "a: | b | c");
        assert_eq!(
            one_line("bad:\n  ┌─ wgsl:1:2\n  │\n1 │ x\n"),
            "bad: | ┌─ wgsl:1:2 | 1 │ x"
        );
    }
}
