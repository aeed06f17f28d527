//! The fault-injecting TCP proxy on every node-to-node link: latency, loss, one-way and
//! full partitions, with no root needed.
//!
//! Each ordered pair of nodes (A, B) gets its own listener on loopback; node A is
//! started with `--peer-route B_ADDR=LISTENER` ([`Links::route_args`]), so every
//! connection A opens to B passes through the link (A, B). The proxy is a dumb TCP
//! relay: mutual TLS still runs end to end between the nodes, so the proxy can delay,
//! drop or cut a byte stream but never read or alter it.
//!
//! A TCP connection on link (A, B) carries A's requests *and* B's answers, so a fault
//! on (A, B) acts on both directions of that connection; B's own link (B, A) is
//! unaffected. That is what makes a one-way partition: (A, B) partitioned, (B, A) not.
//!
//! The relays run on a tokio runtime that [`Links`] owns, so a synchronous harness can
//! use it without being inside a runtime; dropping [`Links`] closes every listener and
//! connection.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// Largest chunk read from a socket in one go. Each fault decision (delay, loss) is
/// made per chunk; 16 KiB is the size of a TLS record, so a chunk is at most about
/// one record and loss hits records, not whole bursts.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks that may wait in one direction of one connection (held by a delay, or behind
/// a slow receiver) before the proxy stops reading: bounds memory to
/// `QUEUE_CHUNKS * CHUNK_BYTES` (1 MiB) per direction and passes back-pressure on to
/// the sender, as a full TCP window would.
const QUEUE_CHUNKS: usize = 64;
/// Connections one link relays at once. A node keeps one or two connections per peer
/// and reconnects after a cut, so 256 is far above normal use; beyond it the listener
/// stops accepting (back-pressure) instead of growing without bound.
const MAX_CONNECTIONS_PER_LINK: usize = 256;
/// How long the proxy waits to reach the real node. A node that is down refuses at
/// once; this only bounds a dial that hangs, so the client sees a closed connection
/// (and retries) instead of waiting forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (out of file descriptors, say) before trying again,
/// so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);
/// Worker threads of the proxy's runtime: relaying is light, and the machines running
/// the harness have two cores that the nodes need too.
const RUNTIME_THREADS: usize = 2;

/// What a link does to traffic from one node to another.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum LinkFault {
    /// Relay everything unchanged.
    Pass,
    /// The source node cannot reach the target: new connections on the link are
    /// accepted and closed at once, open ones are cut, bytes read are discarded.
    Partition,
    /// Hold every chunk, in both directions of each connection, this long before
    /// forwarding it (order is kept): a one-way latency, so a request/answer round
    /// trip over the link takes at least twice this longer.
    Delay(Duration),
    /// For each chunk read (either direction), the probability in `[0, 1]` that the
    /// connection is cut there. A byte stream cannot lose bytes without breaking TLS,
    /// so loss shows as cut connections; the node's client reconnects, which is what
    /// packet loss looks like to it.
    Loss(f64),
}

/// Counters of one link (or of all links, [`Links::total`]) since [`Links::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Connections accepted and relayed (those refused by a partition not included).
    pub connections: u64,
    /// Bytes written to the other end, both directions.
    pub bytes_forwarded: u64,
    /// Bytes read but never delivered: read while partitioned, in the chunk that a loss
    /// cut at, or still queued (delayed) when the connection was cut.
    pub bytes_dropped: u64,
    /// Connections accepted and closed at once because the link was partitioned.
    pub connections_refused: u64,
    /// Relayed connections cut by a partition or by loss.
    pub connections_cut: u64,
    /// Chunks held back by a delay.
    pub chunks_delayed: u64,
}

impl LinkStats {
    /// What happened between `earlier` (a snapshot of the same counters) and `self`:
    /// lets a run show that a fault injected between the two snapshots took effect.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        LinkStats {
            connections: self.connections.saturating_sub(earlier.connections),
            bytes_forwarded: self.bytes_forwarded.saturating_sub(earlier.bytes_forwarded),
            bytes_dropped: self.bytes_dropped.saturating_sub(earlier.bytes_dropped),
            connections_refused: self
                .connections_refused
                .saturating_sub(earlier.connections_refused),
            connections_cut: self.connections_cut.saturating_sub(earlier.connections_cut),
            chunks_delayed: self.chunks_delayed.saturating_sub(earlier.chunks_delayed),
        }
    }

    fn add(&mut self, other: &LinkStats) {
        self.connections += other.connections;
        self.bytes_forwarded += other.bytes_forwarded;
        self.bytes_dropped += other.bytes_dropped;
        self.connections_refused += other.connections_refused;
        self.connections_cut += other.connections_cut;
        self.chunks_delayed += other.chunks_delayed;
    }
}

/// The live counters behind a [`LinkStats`].
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes_forwarded: AtomicU64,
    bytes_dropped: AtomicU64,
    connections_refused: AtomicU64,
    connections_cut: AtomicU64,
    chunks_delayed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LinkStats {
        LinkStats {
            connections: self.connections.load(Ordering::Relaxed),
            bytes_forwarded: self.bytes_forwarded.load(Ordering::Relaxed),
            bytes_dropped: self.bytes_dropped.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            connections_cut: self.connections_cut.load(Ordering::Relaxed),
            chunks_delayed: self.chunks_delayed.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// SplitMix64: a tiny seeded generator, enough to decide losses reproducibly from a
/// run's seed without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One directed link: its listener's address, the real target, the current fault.
struct Link {
    from: usize,
    to: usize,
    listen: SocketAddr,
    target: String,
    fault: watch::Sender<LinkFault>,
    counters: Counters,
    rng: Mutex<SplitMix64>,
}

impl Link {
    fn fault(&self) -> LinkFault {
        *self.fault.borrow()
    }

    /// Whether a chunk is lost under `Loss(p)`.
    fn lose(&self, p: f64) -> bool {
        let roll = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_f64();
        roll < p
    }
}

/// How a relayed connection ended early.
enum End {
    /// The proxy cut it (partition or loss).
    Cut,
    /// One of the endpoints failed or reset it.
    Io,
}

/// Every directed node-to-node link of a cluster, each with its own proxy listener.
pub struct Links {
    n: usize,
    /// Row-major `from * n + to`; `None` on the diagonal.
    links: Vec<Option<Arc<Link>>>,
    /// The relays' runtime; taken and shut down without blocking on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Links {
    /// Create listeners for every ordered pair (from, to) of `nodes` (node index ->
    /// the node-to-node address its peers dial, e.g. `"127.0.0.1:7720"`), on free
    /// loopback ports, and start relaying on a background runtime owned by `Links`
    /// (the caller need not be inside a runtime, but may be). `seed` drives the loss
    /// decisions: each link draws from its own generator derived from it.
    pub fn start(nodes: &[String], seed: u64) -> Result<Links> {
        let n = nodes.len();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("mesh-chaos-proxy")
            .enable_all()
            .build()
            .context("start the proxy's tokio runtime")?;
        let mut links = Vec::with_capacity(n * n);
        for from in 0..n {
            for (to, target) in nodes.iter().enumerate() {
                if from == to {
                    links.push(None);
                    continue;
                }
                let std_listener = std::net::TcpListener::bind("127.0.0.1:0")
                    .with_context(|| format!("bind a loopback port for the link {from}->{to}"))?;
                std_listener.set_nonblocking(true)?;
                let listen = std_listener.local_addr()?;
                let listener = {
                    let _runtime = runtime.enter();
                    TcpListener::from_std(std_listener)?
                };
                let link_seed = SplitMix64(
                    seed ^ (((from as u64) << 32) | to as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                )
                .next_u64();
                let link = Arc::new(Link {
                    from,
                    to,
                    listen,
                    target: target.clone(),
                    fault: watch::Sender::new(LinkFault::Pass),
                    counters: Counters::default(),
                    rng: Mutex::new(SplitMix64(link_seed)),
                });
                runtime.spawn(accept_loop(listener, link.clone()));
                links.push(Some(link));
            }
        }
        Ok(Links {
            n,
            links,
            runtime: Some(runtime),
        })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn link(&self, from: usize, to: usize) -> &Link {
        match (from < self.n && to < self.n).then(|| self.links[from * self.n + to].as_deref()).flatten() {
            Some(link) => link,
            None => panic!("no link {from}->{to}: the links join {} nodes, indexes 0..{}, and a node has no link to itself", self.n, self.n),
        }
    }

    /// The `--peer-route` arguments node `from` must be started with, one pair per other
    /// node: `["--peer-route", "127.0.0.1:7720=127.0.0.1:40123", ...]`.
    pub fn route_args(&self, from: usize) -> Vec<String> {
        (0..self.n)
            .filter(|to| *to != from)
            .flat_map(|to| {
                let link = self.link(from, to);
                [
                    "--peer-route".to_string(),
                    format!("{}={}", link.target, link.listen),
                ]
            })
            .collect()
    }

    /// The proxy address of the link `from -> to`.
    pub fn listen_addr(&self, from: usize, to: usize) -> SocketAddr {
        self.link(from, to).listen
    }

    /// Set the fault of the link `from -> to`. Takes effect at once on open
    /// connections too: a partition cuts them, a delay or loss applies from the next
    /// chunk read. Panics on a link that does not exist (`from == to`, out of range)
    /// or a loss probability outside `[0, 1]`.
    pub fn set(&self, from: usize, to: usize, fault: LinkFault) {
        if let LinkFault::Loss(p) = fault {
            assert!(
                (0.0..=1.0).contains(&p),
                "loss probability {p} is not in [0, 1]"
            );
        }
        self.link(from, to).fault.send_replace(fault);
    }

    /// The current fault of the link `from -> to`.
    pub fn fault(&self, from: usize, to: usize) -> LinkFault {
        self.link(from, to).fault()
    }

    /// Every link back to [`LinkFault::Pass`].
    pub fn heal_all(&self) {
        for link in self.links.iter().flatten() {
            link.fault.send_replace(LinkFault::Pass);
        }
    }

    /// Counters of the link `from -> to` since start.
    pub fn stats(&self, from: usize, to: usize) -> LinkStats {
        self.link(from, to).counters.snapshot()
    }

    /// Counters of all links together since start.
    pub fn total(&self) -> LinkStats {
        let mut total = LinkStats::default();
        for link in self.links.iter().flatten() {
            total.add(&link.counters.snapshot());
        }
        total
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // Not `drop(runtime)`: that blocks, and panics if the harness itself runs
        // inside a runtime. Shutting down in the background drops every relay (and so
        // closes every socket) without waiting.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for link in self.links.iter().flatten() {
            list.entry(&format_args!(
                "{}->{} {} -> {} {:?}",
                link.from,
                link.to,
                link.listen,
                link.target,
                link.fault()
            ));
        }
        list.finish()
    }
}

async fn accept_loop(listener: TcpListener, link: Arc<Link>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_LINK));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((client, _)) => {
                let link = link.clone();
                tokio::spawn(async move {
                    serve(client, &link).await;
                    drop(permit);
                });
            }
            Err(_) => tokio::time::sleep(ACCEPT_RETRY).await,
        }
    }
}

/// Resolves once the link is partitioned (at once if it already is).
async fn partitioned(mut fault: watch::Receiver<LinkFault>) {
    loop {
        if *fault.borrow_and_update() == LinkFault::Partition {
            return;
        }
        if fault.changed().await.is_err() {
            // The link is gone with its runtime; nothing will partition it now.
            std::future::pending::<()>().await;
        }
    }
}

/// Relay one accepted connection to the link's target until either side closes, or
/// the link's fault cuts it.
async fn serve(client: TcpStream, link: &Link) {
    if link.fault() == LinkFault::Partition {
        refuse(client, link);
        return;
    }
    bump(&link.counters.connections, 1);
    let cut = partitioned(link.fault.subscribe());
    tokio::pin!(cut);
    let server = tokio::select! {
        dialed = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&link.target)) => match dialed {
            Ok(Ok(server)) => server,
            // The node is down or hangs: closing the client is what it would see.
            _ => return,
        },
        () = &mut cut => {
            bump(&link.counters.connections_cut, 1);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Bytes read from one end and not yet written to the other: dropped if cut now.
    let in_flight = AtomicU64::new(0);
    let ended = tokio::select! {
        both = async {
            tokio::try_join!(
                pump(client_read, server_write, link, &in_flight),
                pump(server_read, client_write, link, &in_flight),
            )
        } => both.map(|_| ()),
        () = &mut cut => Err(End::Cut),
    };
    match ended {
        Ok(()) | Err(End::Io) => {}
        Err(End::Cut) => {
            bump(&link.counters.connections_cut, 1);
            bump(
                &link.counters.bytes_dropped,
                in_flight.load(Ordering::Relaxed),
            );
        }
    }
}

/// Close a connection accepted on a partitioned link, counting what it had already
/// sent as dropped.
fn refuse(client: TcpStream, link: &Link) {
    bump(&link.counters.connections_refused, 1);
    let mut buf = [0u8; CHUNK_BYTES];
    while let Ok(n @ 1..) = client.try_read(&mut buf) {
        bump(&link.counters.bytes_dropped, n as u64);
    }
}

/// One direction of a relayed connection: read chunks, decide each chunk's fate from
/// the link's current fault, queue it (bounded) until it is due, write it.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: &Link,
    in_flight: &AtomicU64,
) -> Result<(), End> {
    let (queue, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let read = async move {
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let n = from.read(&mut chunk).await.map_err(|_| End::Io)?;
            if n == 0 {
                // End of stream: dropping `queue` lets the writer flush and pass it on.
                return Ok(());
            }
            chunk.truncate(n);
            let now = Instant::now();
            let at = match link.fault() {
                LinkFault::Pass => now,
                LinkFault::Delay(d) if d.is_zero() => now,
                LinkFault::Delay(d) => {
                    bump(&link.counters.chunks_delayed, 1);
                    now + d
                }
                LinkFault::Partition => {
                    bump(&link.counters.bytes_dropped, n as u64);
                    return Err(End::Cut);
                }
                LinkFault::Loss(p) if link.lose(p) => {
                    bump(&link.counters.bytes_dropped, n as u64);
                    return Err(End::Cut);
                }
                LinkFault::Loss(_) => now,
            };
            in_flight.fetch_add(n as u64, Ordering::Relaxed);
            if queue.send((at, chunk)).await.is_err() {
                // The writer stopped on an error, which `try_join` reports.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            to.write_all(&chunk).await.map_err(|_| End::Io)?;
            in_flight.fetch_sub(chunk.len() as u64, Ordering::Relaxed);
            bump(&link.counters.bytes_forwarded, chunk.len() as u64);
        }
        let _ = to.shutdown().await;
        Ok::<(), End>(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    /// A tokio echo server on loopback; returns its address.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Two "nodes" that are echo servers, with links between them.
    async fn two_nodes() -> Links {
        let nodes = vec![echo_server().await, echo_server().await];
        Links::start(&nodes, 7).unwrap()
    }

    /// Send `msg` on `conn` and read the echo back, within a second.
    async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        // Write and read at once: a payload larger than all the buffers on the way
        // would deadlock if the echo were only read after the whole write.
        let (mut r, mut w) = conn.split();
        let mut back = vec![0u8; msg.len()];
        let fut = async {
            tokio::try_join!(w.write_all(msg), r.read_exact(&mut back))?;
            Ok(back)
        };
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no echo within 1s",
                ))
            })
    }

    async fn connect(links: &Links, from: usize, to: usize) -> TcpStream {
        TcpStream::connect(links.listen_addr(from, to))
            .await
            .unwrap()
    }

    /// Whether the proxy has closed `conn`: a read returns end of stream or an error.
    async fn is_closed(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Poll until `cond` holds (counters are bumped by the relay tasks, a moment after
    /// the client sees the effect).
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = StdInstant::now() + Duration::from_secs(2);
        while !cond() {
            assert!(
                StdInstant::now() < deadline,
                "not reached within 2s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn pass_through_relays_and_counts_bytes() {
        let links = two_nodes().await;
        let mut conn = connect(&links, 0, 1).await;
        assert_eq!(
            round_trip(&mut conn, b"hello mesh").await.unwrap(),
            b"hello mesh"
        );
        // A payload bigger than a chunk and than the queue arrives whole and in order.
        let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut conn, &big).await.unwrap(), big);
        let want = 2 * (10 + big.len() as u64);
        eventually("both directions counted", || {
            links.stats(0, 1).bytes_forwarded == want
        })
        .await;
        let s = links.stats(0, 1);
        assert_eq!(s.connections, 1);
        assert_eq!(
            (s.bytes_dropped, s.connections_cut, s.connections_refused),
            (0, 0, 0)
        );
        assert_eq!(links.stats(1, 0), LinkStats::default());
        assert_eq!(links.total(), s);
    }

    #[tokio::test]
    async fn route_args_point_every_peer_at_its_link() {
        let nodes = vec![
            "127.0.0.1:1".to_string(),
            "127.0.0.1:2".to_string(),
            "127.0.0.1:3".to_string(),
        ];
        let links = Links::start(&nodes, 1).unwrap();
        let args = links.route_args(1);
        assert_eq!(
            args,
            [
                "--peer-route".to_string(),
                format!("127.0.0.1:1={}", links.listen_addr(1, 0)),
                "--peer-route".to_string(),
                format!("127.0.0.1:3={}", links.listen_addr(1, 2)),
            ]
        );
    }

    #[tokio::test]
    async fn partition_refuses_new_and_cuts_open_connections() {
        let links = two_nodes().await;
        let mut open = connect(&links, 0, 1).await;
        round_trip(&mut open, b"before").await.unwrap();
        links.set(0, 1, LinkFault::Partition);
        assert!(
            is_closed(&mut open).await,
            "the open connection was not cut"
        );
        eventually("cut counted", || links.stats(0, 1).connections_cut == 1).await;

        let mut new = connect(&links, 0, 1).await;
        let _ = new.write_all(b"lost").await;
        assert!(
            is_closed(&mut new).await,
            "a new connection was relayed through a partition"
        );
        eventually("refusal counted", || {
            links.stats(0, 1).connections_refused == 1
        })
        .await;
        assert_eq!(
            links.stats(0, 1).connections,
            1,
            "a refused connection is not relayed"
        );
    }

    #[tokio::test]
    async fn bytes_read_while_partitioned_are_dropped() {
        let links = two_nodes().await;
        let mut conn = connect(&links, 0, 1).await;
        round_trip(&mut conn, b"x").await.unwrap();
        // Delay first, so the next chunk sits in the queue when the partition comes.
        links.set(0, 1, LinkFault::Delay(Duration::from_secs(5)));
        conn.write_all(b"queued").await.unwrap();
        eventually("chunk delayed", || links.stats(0, 1).chunks_delayed == 1).await;
        links.set(0, 1, LinkFault::Partition);
        assert!(is_closed(&mut conn).await);
        eventually("queued bytes dropped", || {
            links.stats(0, 1).bytes_dropped == 6
        })
        .await;
        assert_eq!(links.stats(0, 1).connections_cut, 1);
    }

    #[tokio::test]
    async fn one_way_partition_leaves_the_reverse_link_alone() {
        let links = two_nodes().await;
        links.set(0, 1, LinkFault::Partition);
        let mut forward = connect(&links, 0, 1).await;
        assert!(round_trip(&mut forward, b"a to b").await.is_err());
        let mut reverse = connect(&links, 1, 0).await;
        assert_eq!(
            round_trip(&mut reverse, b"b to a").await.unwrap(),
            b"b to a"
        );
        eventually("refusal counted", || {
            links.stats(0, 1).connections_refused == 1
        })
        .await;
        let back = links.stats(1, 0);
        assert_eq!(
            (
                back.connections,
                back.connections_refused,
                back.connections_cut
            ),
            (1, 0, 0)
        );
    }

    #[tokio::test]
    async fn delay_adds_to_a_round_trip() {
        let links = two_nodes().await;
        let d = Duration::from_millis(150);
        let mut conn = connect(&links, 0, 1).await;
        round_trip(&mut conn, b"warm").await.unwrap();
        links.set(0, 1, LinkFault::Delay(d));
        let t = StdInstant::now();
        round_trip(&mut conn, b"slow").await.unwrap();
        // Held once on the way there and once on the way back.
        assert!(
            t.elapsed() >= 2 * d,
            "round trip took {:?}, less than 2 x {d:?}",
            t.elapsed()
        );
        assert_eq!(links.stats(0, 1).chunks_delayed, 2);
    }

    #[tokio::test]
    async fn total_loss_cuts_every_connection_that_sends() {
        let links = two_nodes().await;
        links.set(0, 1, LinkFault::Loss(1.0));
        for i in 0..5u64 {
            let mut conn = connect(&links, 0, 1).await;
            assert!(
                round_trip(&mut conn, b"doomed").await.is_err(),
                "connection {i} survived p=1 loss"
            );
            eventually("cut counted", || links.stats(0, 1).connections_cut == i + 1).await;
        }
        let s = links.stats(0, 1);
        assert_eq!(
            (s.connections, s.bytes_dropped, s.bytes_forwarded),
            (5, 30, 0)
        );
        // A connection that sends nothing loses nothing.
        let mut idle = connect(&links, 0, 1).await;
        let mut buf = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), idle.read(&mut buf))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn partial_loss_follows_the_seed() {
        // The same seed and the same traffic decide the same losses.
        async fn cuts(seed: u64) -> Vec<bool> {
            let echo = echo_server().await;
            let nodes = [echo.clone(), echo];
            let links = Links::start(&nodes, seed).unwrap();
            links.set(0, 1, LinkFault::Loss(0.5));
            let mut out = Vec::new();
            for _ in 0..16 {
                let mut conn = connect(&links, 0, 1).await;
                out.push(round_trip(&mut conn, b"?").await.is_err());
            }
            out
        }
        let a = cuts(42).await;
        assert_eq!(a, cuts(42).await);
        assert!(
            a.contains(&true) && a.contains(&false),
            "p=0.5 over 16 tries: {a:?}"
        );
    }

    #[tokio::test]
    async fn heal_restores_every_link() {
        let links = two_nodes().await;
        links.set(0, 1, LinkFault::Partition);
        links.set(1, 0, LinkFault::Loss(1.0));
        assert!(round_trip(&mut connect(&links, 0, 1).await, b"x")
            .await
            .is_err());
        assert!(round_trip(&mut connect(&links, 1, 0).await, b"x")
            .await
            .is_err());
        links.heal_all();
        assert_eq!(
            (links.fault(0, 1), links.fault(1, 0)),
            (LinkFault::Pass, LinkFault::Pass)
        );
        assert_eq!(
            round_trip(&mut connect(&links, 0, 1).await, b"ok")
                .await
                .unwrap(),
            b"ok"
        );
        assert_eq!(
            round_trip(&mut connect(&links, 1, 0).await, b"ok")
                .await
                .unwrap(),
            b"ok"
        );
    }

    #[test]
    fn works_without_a_caller_runtime() {
        use std::io::{Read, Write};
        // A plain-threads echo server: no runtime anywhere in this test but the proxy's.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let echo = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for mut s in listener.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        let links = Links::start(&[echo.clone(), echo], 3).unwrap();
        let mut conn = std::net::TcpStream::connect(links.listen_addr(1, 0)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn.write_all(b"sync").unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"sync");
    }
}
