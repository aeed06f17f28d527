//! Callbacks used by Storage API

use std::io;

use tokio::sync::oneshot;

use crate::async_runtime::AsyncOneshotSendExt;
use crate::core::notify::Notify;
use crate::raft_state::io_state::log_io_id::LogIOId;
use crate::type_config::alias::OneshotSenderOf;
use crate::LogId;
use crate::RaftTypeConfig;
use crate::StorageIOError;
use crate::Vote;

/// A oneshot callback for completion of log io operation.
pub struct LogFlushed<C>
where C: RaftTypeConfig
{
    log_io_id: LogIOId<C::NodeId>,
    to: FlushedTo<C>,
}

/// Where a [`LogFlushed`] reports.
///
/// Mesh patch: a leader's own append reports to `RaftCore`'s notification channel, so the
/// core goes on (replicating the entries) while the append is being synced.
enum FlushedTo<C>
where C: RaftTypeConfig
{
    /// `RaftCore` awaits the receiver before it runs the next command.
    Waiter(OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>),
    /// `RaftCore` counts the leader's own log progress when this notification arrives.
    Core {
        vote: Vote<C::NodeId>,
        tx: tokio::sync::mpsc::UnboundedSender<Notify<C>>,
    },
}

impl<C> LogFlushed<C>
where C: RaftTypeConfig
{
    pub(crate) fn new(
        log_io_id: LogIOId<C::NodeId>,
        tx: OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>,
    ) -> Self {
        Self {
            log_io_id,
            to: FlushedTo::Waiter(tx),
        }
    }

    /// Mesh patch: a callback whose completion reaches `RaftCore` as a
    /// [`Notify::LocalLogFlushed`] instead of a waiting oneshot.
    pub(crate) fn notify_core(
        log_io_id: LogIOId<C::NodeId>,
        vote: Vote<C::NodeId>,
        tx: tokio::sync::mpsc::UnboundedSender<Notify<C>>,
    ) -> Self {
        Self {
            log_io_id,
            to: FlushedTo::Core { vote, tx },
        }
    }

    /// Report log io completion event.
    ///
    /// It will be called when the log is successfully appended to the storage or an error occurs.
    ///
    /// Callbacks must be completed in the order the appends were made: a leader counts
    /// its own log as durable up to the last completed append.
    pub fn log_io_completed(self, result: Result<(), io::Error>) {
        if let Err(e) = &result {
            tracing::error!("LogFlush error: {}, while flushing upto {}", e, self.log_io_id);
        }
        let sent = match self.to {
            FlushedTo::Waiter(tx) => tx.send(result.map(|()| self.log_io_id)).is_ok(),
            FlushedTo::Core { vote, tx } => tx
                .send(Notify::LocalLogFlushed {
                    vote,
                    log_id: self.log_io_id.log_id,
                    result,
                })
                .is_ok(),
        };

        if !sent {
            tracing::error!("failed to send log io completion event");
        }
    }
}

/// A oneshot callback for completion of applying logs to state machine.
pub struct LogApplied<C>
where C: RaftTypeConfig
{
    last_log_id: LogId<C::NodeId>,
    tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
}

impl<C> LogApplied<C>
where C: RaftTypeConfig
{
    #[allow(dead_code)]
    pub(crate) fn new(
        last_log_id: LogId<C::NodeId>,
        tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
    ) -> Self {
        Self { last_log_id, tx }
    }

    /// Report apply io completion event.
    ///
    /// It will be called when the log is successfully applied to the state machine or an error
    /// occurs.
    pub fn completed(self, result: Result<Vec<C::R>, StorageIOError<C::NodeId>>) {
        let res = match result {
            Ok(x) => {
                tracing::debug!("LogApplied upto {}", self.last_log_id);
                let resp = (self.last_log_id.clone(), x);
                self.tx.send(Ok(resp))
            }
            Err(e) => {
                tracing::error!("LogApplied error: {}, while applying upto {}", e, self.last_log_id);
                self.tx.send(Err(e))
            }
        };

        if let Err(_e) = res {
            tracing::error!("failed to send apply complete event, last_log_id: {}", self.last_log_id);
        }
    }
}
