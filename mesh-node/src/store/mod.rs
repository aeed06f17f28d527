//! The sled store: Raft log, vote, state machine and snapshots.
