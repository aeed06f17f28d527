//! The russh server: key authentication against the admin keys, one tokio task per
//! exec request, bounded connections and request bodies.

use super::command::{self, CommandLine, Reply, Request, MAX_BODY_BYTES};
use super::limits::Limits;
use crate::host_key::{fingerprint_of, HostKey};
use crate::service::Service;
use futures::stream::{FuturesOrdered, StreamExt};
use mesh_core::Fingerprint;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Concurrent SSH connections; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// An idle connection is closed after this long.
const INACTIVITY_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes read from a client's socket at a time. russh reads each packet with two
/// `read_exact` calls (length, then body); through this buffer the packets a client
/// sent together cost one `recvfrom` instead of two each.
const READ_BUFFER: usize = 16 * 1024;
/// Lines of one `submit-stream` being submitted at once.
const STREAM_IN_FLIGHT: usize = 256;
/// How often the rate limiters forget idle addresses and keys.
const LIMITS_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Delay before answering a rejected authentication (slows down key guessing).
const AUTH_REJECTION_TIME: Duration = Duration::from_millis(300);

/// What the endpoint serves.
#[derive(Clone)]
pub enum Endpoint {
    /// A member of a mesh: every operator command.
    Member(Service),
    /// A fresh node waiting for `join TOKEN` (started with `--await-join`); only its
    /// `--admin-key` keys may connect.
    AwaitingJoin {
        /// Where join requests go.
        joins: mpsc::Sender<JoinRequest>,
        /// The keys allowed.
        admins: Arc<BTreeSet<Fingerprint>>,
    },
}

/// A `join TOKEN` received by a node that is not a member yet.
pub struct JoinRequest {
    /// The token string as given.
    pub token: String,
    /// Where the outcome goes: the new node id, or why the join failed.
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// The SSH endpoint of a node.
pub struct SshServer {
    config: Arc<russh::server::Config>,
    endpoint: Endpoint,
    limits: Limits,
}

impl SshServer {
    /// A server presenting `host_key`; which user keys it admits follows `endpoint`.
    pub fn new(host_key: &HostKey, endpoint: Endpoint) -> SshServer {
        let config = russh::server::Config {
            keys: vec![host_key.private_key().clone()],
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: AUTH_REJECTION_TIME,
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(INACTIVITY_TIMEOUT),
            ..Default::default()
        };
        SshServer {
            config: Arc::new(config),
            endpoint,
            limits: Limits::default(),
        }
    }

    /// Serve connections from `listener` until shutdown.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let tracker = TaskTracker::new();
        let mut prune = tokio::time::interval(LIMITS_PRUNE_INTERVAL);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = prune.tick() => { self.limits.prune(); continue; }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!(error = %e, "ssh accept failed"); continue; }
                },
            };
            if self.limits.is_shut_out(peer.ip()) {
                // Too many failed logins from there: close before any handshake work.
                metrics::counter!("mesh_ssh_connections_refused_total", "reason" => "shut_out")
                    .increment(1);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let handler = Connection {
                endpoint: self.endpoint.clone(),
                limits: self.limits.clone(),
                peer,
                user: None,
                channels: HashMap::new(),
                tracker: tracker.clone(),
            };
            let config = self.config.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let stream = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
                match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => {
                        tokio::select! {
                            r = session => if let Err(e) = r { debug!(%peer, error = %e, "ssh session ended") },
                            _ = shutdown.cancelled() => {}
                        }
                    }
                    Err(e) => {
                        metrics::counter!("mesh_ssh_handshake_failures_total").increment(1);
                        debug!(%peer, error = %e, "ssh handshake failed");
                    }
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// One client connection.
struct Connection {
    endpoint: Endpoint,
    limits: Limits,
    peer: SocketAddr,
    user: Option<Fingerprint>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    tracker: TaskTracker,
}

impl Connection {
    fn admit(&self, key: &russh::keys::PublicKey) -> Option<Fingerprint> {
        let fp = fingerprint_of(key);
        let known = match &self.endpoint {
            Endpoint::Member(service) => service.role_of(&fp).is_some(),
            Endpoint::AwaitingJoin { admins, .. } => admins.contains(&fp),
        };
        known.then_some(fp)
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.admit(offer.public_key).is_some() {
            return Ok(Auth::Accept);
        }
        metrics::counter!("mesh_ssh_auth_failures_total", "reason" => "unknown_key").increment(1);
        if self
            .limits
            .auth_failed(self.peer.ip(), Some(&fingerprint_of(offer.public_key)))
        {
            warn!(peer = %self.peer, "too many failed logins: address shut out for a while");
            return Err(russh::Error::Disconnect);
        }
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.admit(key.public_key) {
            Some(fp) => {
                info!(peer = %self.peer, user = %fp, "ssh user authenticated");
                self.user = Some(fp);
                Ok(Auth::Accept)
            }
            None => {
                metrics::counter!("mesh_ssh_auth_failures_total", "reason" => "unknown_key")
                    .increment(1);
                warn!(peer = %self.peer, key = %fingerprint_of(key.public_key), "ssh key refused: not a user key of this mesh");
                self.limits
                    .auth_failed(self.peer.ip(), Some(&fingerprint_of(key.public_key)));
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(channel), Some(user)) = (self.channels.remove(&id), self.user.clone()) else {
            return session.channel_failure(id);
        };
        session.channel_success(id)?;
        let line = String::from_utf8_lossy(data).into_owned();
        debug!(peer = %self.peer, %user, command = %line, "ssh exec");
        self.tracker.spawn(serve_exec(
            self.endpoint.clone(),
            self.limits.clone(),
            user,
            line,
            channel,
        ));
        Ok(())
    }
}

/// Read the body if the command takes one, run it, and send the reply.
async fn serve_exec(
    endpoint: Endpoint,
    limits: Limits,
    user: Fingerprint,
    line: String,
    channel: Channel<Msg>,
) {
    let (mut read, write) = channel.split();
    let service = match endpoint {
        Endpoint::Member(service) => service,
        Endpoint::AwaitingJoin { joins, .. } => {
            let reply = command::awaiting_join(&line, &joins).await;
            send(&write, reply, read).await;
            return;
        }
    };
    let reply = match CommandLine::parse(&line) {
        Err(e) => command::usage_error(&e, line.split_whitespace().any(|w| w == "--json")),
        Ok(cmd) if cmd.request == Request::SubmitStream => {
            submit_stream(&service, &limits, &user, cmd.json, &mut read, &write).await
        }
        Ok(cmd) => {
            let body = if cmd.takes_body() {
                read_body(&mut read).await
            } else {
                Ok(Vec::new())
            };
            match body {
                Ok(body) => command::run(&service, &limits, &cmd, &body, &user).await,
                Err(e) => Reply::error(&e, mesh_core::api::EXIT_ERROR, cmd.json),
            }
        }
    };
    send(&write, reply, read).await;
}

/// Send a reply and close the channel.
async fn send(
    write: &russh::ChannelWriteHalf<Msg>,
    reply: Reply,
    mut read: russh::ChannelReadHalf,
) {
    // Keep draining client messages so a client that sends data we ignore never
    // blocks the session.
    let drain = tokio::spawn(async move { while read.wait().await.is_some() {} });
    let out = async {
        if !reply.stdout.is_empty() {
            write.data(&reply.stdout[..]).await?;
        }
        if !reply.stderr.is_empty() {
            write.extended_data(1, &reply.stderr[..]).await?;
        }
        write.exit_status(reply.status).await?;
        write.eof().await?;
        write.close().await
    };
    if let Err(e) = out.await {
        debug!(error = %e, "client went away before the reply was sent");
    }
    drain.abort();
}

/// `submit-stream`: each line of standard input is a task spec, submitted as it
/// arrives and answered by one line as soon as it is committed (or refused), in input
/// order, while the channel stays open. Up to [`STREAM_IN_FLIGHT`] lines are in
/// flight at once, so a fast producer's tasks share Raft entries; a client that waits
/// for each answer gets one round trip per task and no channel set-up. Ends at EOF
/// once every answer is out; exit status 1 if any line was refused.
async fn submit_stream(
    service: &Service,
    limits: &Limits,
    user: &Fingerprint,
    json: bool,
    read: &mut russh::ChannelReadHalf,
    write: &russh::ChannelWriteHalf<Msg>,
) -> Reply {
    let mut partial: Vec<u8> = Vec::new();
    let mut in_flight = FuturesOrdered::new();
    let (mut input_open, mut refused, mut too_long) = (true, 0usize, false);
    let submit = |line: Vec<u8>| async move {
        command::submit_line(service, limits, user, &line, json).await
    };
    loop {
        tokio::select! {
            msg = read.wait(), if input_open && in_flight.len() < STREAM_IN_FLIGHT => match msg {
                Some(ChannelMsg::Data { data }) => {
                    for line in take_lines(&mut partial, &data) {
                        in_flight.push_back(submit(line));
                    }
                    if partial.len() > MAX_BODY_BYTES {
                        (input_open, too_long) = (false, true);
                    }
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    input_open = false;
                    if !partial.trim_ascii().is_empty() {
                        in_flight.push_back(submit(std::mem::take(&mut partial)));
                    }
                }
                Some(_) => {}
            },
            Some((out, ok)) = in_flight.next() => {
                refused += usize::from(!ok);
                if write.data(&out[..]).await.is_err() {
                    return Reply::default();
                }
            }
            else => break,
        }
    }
    if too_long {
        return Reply::error(
            &format!("a line of submit-stream is longer than {MAX_BODY_BYTES} bytes; the stream was cut there"),
            mesh_core::api::EXIT_ERROR,
            false,
        );
    }
    Reply {
        status: if refused == 0 {
            0
        } else {
            mesh_core::api::EXIT_ERROR
        },
        ..Reply::default()
    }
}

/// Appends `data` to `partial` and takes out every whole line (without its newline;
/// blank lines dropped); `partial` keeps the start of the next line. Only the new bytes
/// are searched (what was kept holds no newline), so a long line costs its length once;
/// `memchr` searches many bytes at a time (the byte-by-byte scan it replaced showed as
/// ~1 % of a leader's samples in a profile at 16 streaming clients).
fn take_lines(partial: &mut Vec<u8>, data: &[u8]) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let (mut start, mut search) = (0, partial.len());
    partial.extend_from_slice(data);
    while let Some(at) = memchr::memchr(b'\n', &partial[search..]) {
        let line = &partial[start..search + at];
        if !line.trim_ascii().is_empty() {
            lines.push(line.to_vec());
        }
        start = search + at + 1;
        search = start;
    }
    partial.drain(..start);
    lines
}

async fn read_body(read: &mut russh::ChannelReadHalf) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if body.len() + data.len() > MAX_BODY_BYTES {
                    return Err(format!(
                        "the request body is larger than {MAX_BODY_BYTES} bytes; task inputs are limited to {} bytes",
                        mesh_core::limits::MAX_TASK_INPUT_BYTES
                    ));
                }
                body.extend_from_slice(&data);
            }
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_taken_whole_across_chunks() {
        let mut partial = Vec::new();
        assert!(take_lines(&mut partial, b"{\"a\":").is_empty());
        assert_eq!(
            take_lines(&mut partial, b"1}\n\n  \n{\"b\""),
            vec![b"{\"a\":1}".to_vec()]
        );
        assert_eq!(partial, b"{\"b\"");
        assert_eq!(
            take_lines(&mut partial, b":2}\n{\"c\":3}\n"),
            vec![b"{\"b\":2}".to_vec(), b"{\"c\":3}".to_vec()]
        );
        assert!(partial.is_empty());
    }
}
