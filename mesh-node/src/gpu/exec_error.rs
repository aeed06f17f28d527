//! What can go wrong when the daemon runs a kernel through a GPU worker process, and
//! whether another attempt can help.

use super::wire::ChildError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Why [`Supervisor::run`](super::Supervisor::run) returned no outputs.
///
/// Each variant says who caused it: the task (a kernel that runs too long, does not
/// compile or is too large), the operator (cancel), or the machine (a worker process
/// that crashed or could not start, a lost device).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The task: the kernel ran past the task's timeout; its worker was killed.
    #[error("timed out after {0:?}: the kernel was killed")]
    Timeout(Duration),
    /// The operator (or the scheduler) cancelled the attempt; its worker was killed.
    #[error("cancelled: the kernel was killed")]
    Cancelled,
    /// The machine: the worker process died in the middle of the job (a driver crash,
    /// the OOM killer, a signal from outside).
    #[error("the GPU worker process crashed ({status}): {}", tail_or_silence(.stderr_tail))]
    Crashed {
        /// How it ended.
        status: ChildExit,
        /// Its last lines on stderr.
        stderr_tail: String,
    },
    /// The executor in the worker refused or failed the job (compile error, buffers
    /// over the limits, device lost, ...): the executor's own error.
    #[error(transparent)]
    Gpu(ChildError),
    /// The machine: no worker process was free before the job's deadline, because
    /// every slot was restarting (or busy).
    #[error("no GPU worker process was free within {waited:?}: {reason}")]
    Unavailable {
        /// How long the job waited.
        waited: Duration,
        /// What the slots were doing.
        reason: String,
    },
    /// The machine: the worker wrote something that is not a reply to this job
    /// (a different build, memory corruption). It was killed and restarted.
    #[error("the GPU worker process broke the pipe protocol ({0}); it was restarted")]
    Protocol(String),
    /// The task: the job does not fit through the worker pipe.
    #[error(
        "the job takes {bytes} bytes, over the {limit}-byte limit of the GPU worker pipe; \
         split the work into smaller tasks"
    )]
    TooLarge {
        /// Bytes of its inputs in all, or of its encoded header.
        bytes: usize,
        /// [`super::wire::MAX_FRAME_BYTES`].
        limit: usize,
    },
    /// The task: its buffers exceed this node's GPU memory budget (`--gpu-memory-budget`).
    #[error("the kernel's buffers take {bytes} bytes, over this node's GPU memory budget of {budget} bytes")]
    OverBudget {
        /// Bytes the dispatch would allocate.
        bytes: u64,
        /// The configured budget.
        budget: u64,
    },
    /// The node: the supervisor is shutting down; the kernel, if it started, was killed.
    #[error("the node is shutting down: the kernel was stopped")]
    ShuttingDown,
}

impl ExecError {
    /// Whether another attempt (here or on another node) may succeed. A timeout is
    /// retried because the machine may have been slow; the task's attempt limit keeps
    /// a kernel that never ends from running forever. Cancelled work is never retried.
    pub fn retryable(&self) -> bool {
        match self {
            ExecError::Timeout(_)
            | ExecError::Crashed { .. }
            | ExecError::Unavailable { .. }
            | ExecError::Protocol(_)
            | ExecError::ShuttingDown => true,
            ExecError::Gpu(e) => e.retryable,
            ExecError::Cancelled | ExecError::TooLarge { .. } => false,
            // Another node may have a larger budget.
            ExecError::OverBudget { .. } => true,
        }
    }
}

fn tail_or_silence(tail: &str) -> &str {
    if tail.trim().is_empty() {
        "it wrote nothing to stderr"
    } else {
        tail
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this status code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It did not end (or could not be waited for) within the grace period and was
    /// killed.
    Unknown,
}

impl From<std::process::ExitStatus> for ChildExit {
    fn from(status: std::process::ExitStatus) -> ChildExit {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(code), _) => ChildExit::Code(code),
            (None, Some(signal)) => ChildExit::Signal(signal),
            (None, None) => ChildExit::Unknown,
        }
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildExit::Code(code) => write!(f, "exit code {code}"),
            ChildExit::Signal(signal) => match signal_name(*signal) {
                Some(name) => write!(f, "signal {signal}, {name}"),
                None => write!(f, "signal {signal}"),
            },
            ChildExit::Unknown => f.write_str("exit status unknown"),
        }
    }
}

/// Names of the signals a crashing or killed worker ends with (Linux numbering).
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// Why [`Supervisor::start`](super::Supervisor::start) could not start any worker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The machine: the worker started but could not open an adapter (no driver, the
    /// driver refused a device). The message is the executor's.
    #[error(transparent)]
    Adapter(ChildError),
    /// The installation: the worker program could not be executed.
    #[error("cannot start the GPU worker process {}: {source}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The machine: the worker died before saying whether it opened an adapter.
    #[error("the GPU worker process exited before it was ready ({status}): {}", tail_or_silence(.stderr_tail))]
    Exited {
        /// How it ended.
        status: ChildExit,
        /// Its last lines on stderr.
        stderr_tail: String,
    },
    /// The machine: the worker did not say within this long whether it opened an
    /// adapter; it was killed.
    #[error("the GPU worker process was not ready within {0:?}; it was killed")]
    NotReady(Duration),
    /// The installation: the program answered, but not as a Mesh GPU worker of this
    /// build.
    #[error("{0}")]
    Protocol(String),
    /// A supervisor needs at least one slot.
    #[error("a GPU supervisor needs at least one slot")]
    NoSlots,
}

impl StartError {
    /// True when the worker ran and found no usable adapter: the node should run
    /// without GPU work rather than fail.
    pub fn no_adapter(&self) -> bool {
        matches!(self, StartError::Adapter(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::wire::ChildErrorKind;

    #[test]
    fn messages_read_well_in_the_cli() {
        assert_eq!(
            ExecError::Timeout(Duration::from_secs(2)).to_string(),
            "timed out after 2s: the kernel was killed"
        );
        let crashed = ExecError::Crashed {
            status: ChildExit::Signal(11),
            stderr_tail: "lvp: oops".into(),
        };
        assert_eq!(
            crashed.to_string(),
            "the GPU worker process crashed (signal 11, SIGSEGV): lvp: oops"
        );
        let silent = ExecError::Crashed {
            status: ChildExit::Code(101),
            stderr_tail: String::new(),
        };
        assert_eq!(
            silent.to_string(),
            "the GPU worker process crashed (exit code 101): it wrote nothing to stderr"
        );
    }

    #[test]
    fn retryable_follows_who_caused_it() {
        let gpu = |kind, retryable| {
            ExecError::Gpu(ChildError {
                message: String::new(),
                retryable,
                kind,
            })
        };
        assert!(ExecError::Timeout(Duration::from_secs(1)).retryable());
        assert!(!ExecError::Cancelled.retryable());
        assert!(gpu(ChildErrorKind::DeviceLost, true).retryable());
        assert!(!gpu(ChildErrorKind::Compile, false).retryable());
        assert!(ExecError::Crashed {
            status: ChildExit::Signal(6),
            stderr_tail: String::new()
        }
        .retryable());
    }
}
