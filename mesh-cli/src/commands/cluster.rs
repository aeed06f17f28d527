//! The cluster commands: join tokens (`token create/list/revoke`), `join`, `remove`,
//! `drain` and `undrain`.
//! Membership is the node's business (docs/ssh-protocol.md); these ask and print, and
//! check locally what can be checked before anything is sent.

use super::{call, call_as, show, Context, Reply};
use crate::args::TokenCommand;
use crate::connection::Connection;
use crate::exit_code::ExitError;
use crate::render;
use anyhow::Context as _;
use mesh_core::api::{NodeView, TokenCreated, TokenView};
use mesh_core::token::JoinToken;
use mesh_core::NodeId;
use serde::Deserialize;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

/// The answer to `token revoke ID`.
#[derive(Deserialize)]
struct Revoked {
    revoked: String,
}

/// The answer to `remove NODE`.
#[derive(Deserialize)]
struct Removed {
    removed: NodeId,
}

/// The answer to `drain NODE`.
#[derive(Deserialize)]
struct Drained {
    drained: NodeId,
}

/// The answer to `undrain NODE`.
#[derive(Deserialize)]
struct Undrained {
    undrained: NodeId,
}

/// The answer to `join TOKEN`.
#[derive(Deserialize)]
struct Joined {
    node: NodeId,
}

/// `token create`, `token list`, `token revoke`.
pub(super) async fn token(
    ctx: &Context,
    conn: &Connection,
    command: TokenCommand,
    now_ms: u64,
) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { ttl, uses } => {
            let r: Reply<TokenCreated> = call(conn, &create_line(ttl, uses), None).await?;
            // The token alone on stdout, so that `T=$(mesh-cli token create)` works.
            show(ctx, &r, || format!("{}\n", r.value.token))?;
            if !ctx.json && std::io::stderr().is_terminal() {
                eprintln!("{}", render::token_hint(&r.value, uses, now_ms));
            }
            Ok(())
        }
        TokenCommand::List => {
            let r: Reply<Vec<TokenView>> = call(conn, "token list --json", None).await?;
            show(ctx, &r, || render::tokens(&r.value, now_ms))
        }
        TokenCommand::Revoke { id } => {
            let r: Reply<Revoked> = call(conn, &format!("token revoke {id} --json"), None).await?;
            show(ctx, &r, || {
                format!(
                    "token {} revoked; no further machine can join with it\n",
                    r.value.revoked
                )
            })
        }
    }
}

/// The exec line of `token create`. The TTL goes as whole milliseconds: one word the
/// node parses to exactly what was checked here (`1h 30m` would be split in two).
fn create_line(ttl: Duration, uses: u32) -> String {
    format!(
        "token create --ttl {}ms --uses {uses} --json",
        ttl.as_millis()
    )
}

/// The token given to `join`. Its error does not quote the token (it may hold a real
/// secret with a typo elsewhere); a malformed argument exits 2, as clap's errors do.
pub(super) fn parse_token(text: &str) -> anyhow::Result<JoinToken> {
    JoinToken::parse(text)
        .map_err(|e| ExitError::Usage(format!("the TOKEN of join is unusable: {e}")).into())
}

/// `join TOKEN`: ask the local, not yet joined node to join the mesh of the token.
pub(super) async fn join(
    ctx: &Context,
    conn: &Connection,
    token: &JoinToken,
) -> anyhow::Result<()> {
    let (command, shown) = join_line(token);
    let r: Reply<Joined> = call_as(conn, &command, &shown, None)
        .await
        .map_err(explain_unknown_join)?;
    show(ctx, &r, || format!("joined as node {}\n", r.value.node))
}

/// A member of a mesh (or an older mesh-node) does not know `join`. Its answer is
/// kept as it came, exit status included; what `join` needs follows it.
fn explain_unknown_join(err: anyhow::Error) -> anyhow::Error {
    match err.downcast_ref::<ExitError>() {
        Some(ExitError::Usage(m)) if m.contains("unknown command 'join'") => {
            ExitError::Usage(format!(
                "{m}; `join` goes to a node that is not in a mesh yet (started with \
             `mesh-node run --await-join`): is --node that node?"
            ))
            .into()
        }
        _ => err,
    }
}

/// The exec line of `join`, and how messages name it: by the token's public id, never
/// with its secret.
fn join_line(token: &JoinToken) -> (String, String) {
    (
        format!("join {} --json", token.encode()),
        format!("join <token {}> --json", token.id),
    )
}

/// `remove NODE [--yes]`.
pub(super) async fn remove(
    ctx: &Context,
    conn: &Connection,
    node: NodeId,
    yes: bool,
) -> anyhow::Result<()> {
    let nodes: Reply<Vec<NodeView>> = call(conn, "nodes --json", None).await?;
    let addr = removable(&nodes.value, node)?.addr.clone();
    if !yes && std::io::stdin().is_terminal() {
        let question = format!("remove node {node} ({addr}) from the mesh for good? [y/N] ");
        if !confirm(question).await? {
            anyhow::bail!(
                "node {node} was not removed: the answer was not yes (pass --yes to skip the question)"
            );
        }
    }
    let r: Reply<Removed> = call(conn, &format!("remove {node} --json"), None).await?;
    show(ctx, &r, || {
        format!(
            "removed node {} ({addr}) from the mesh; tasks it held are queued again\n",
            r.value.removed
        )
    })
}

/// `drain NODE` (`draining`) or `undrain NODE`. No question is asked: either is undone
/// by the other.
pub(super) async fn drain(
    ctx: &Context,
    conn: &Connection,
    node: NodeId,
    draining: bool,
) -> anyhow::Result<()> {
    let nodes: Reply<Vec<NodeView>> = call(conn, "nodes --json", None).await?;
    let target = member(&nodes.value, node, |n| {
        format!(
            "node {node} ({}) was removed from the mesh; a removed node takes no tasks and cannot be {}",
            n.addr,
            if draining { "drained" } else { "undrained" }
        )
    })?;
    let (addr, was_drained) = (target.addr.clone(), target.drained);
    if draining {
        let r: Reply<Drained> = call(conn, &format!("drain {node} --json"), None).await?;
        show(ctx, &r, || {
            let again = if was_drained { " (it already was)" } else { "" };
            format!(
                "drained node {} ({addr}){again}: no new tasks are placed there; tasks already there are \
                 not cancelled. Undo with: mesh-cli undrain {node}\n",
                r.value.drained
            )
        })
    } else {
        let r: Reply<Undrained> = call(conn, &format!("undrain {node} --json"), None).await?;
        show(ctx, &r, || {
            let again = if was_drained {
                ""
            } else {
                " (it was not drained)"
            };
            format!(
                "undrained node {} ({addr}){again}: it takes new tasks again\n",
                r.value.undrained
            )
        })
    }
}

/// The node to remove, or why it cannot be.
fn removable(nodes: &[NodeView], id: NodeId) -> anyhow::Result<&NodeView> {
    member(nodes, id, |n| {
        format!("node {id} ({}) was already removed from the mesh", n.addr)
    })
}

/// A node of the mesh that is not removed, or why not: `removed` says what a removed
/// node means for the command; an unknown id is answered with the ids that exist.
fn member(
    nodes: &[NodeView],
    id: NodeId,
    removed: impl FnOnce(&NodeView) -> String,
) -> anyhow::Result<&NodeView> {
    match nodes.iter().find(|n| n.id == id) {
        Some(n) if n.health == "removed" => Err(anyhow::anyhow!(removed(n))),
        Some(n) => Ok(n),
        None => {
            let members: Vec<String> = nodes
                .iter()
                .filter(|n| n.health != "removed")
                .map(|n| n.id.to_string())
                .collect();
            if members.is_empty() {
                anyhow::bail!("node {id} is not in the mesh, which lists no nodes");
            }
            anyhow::bail!(
                "node {id} is not in the mesh; its nodes are {} (see `mesh-cli nodes`)",
                members.join(", ")
            )
        }
    }
}

/// Ask on stderr, read one line from stdin. Blocking reads run off the runtime's only
/// thread, so that the session's keepalives go on while the user thinks.
async fn confirm(question: String) -> anyhow::Result<bool> {
    tokio::task::spawn_blocking(move || {
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(question.as_bytes())?;
        stderr.flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        Ok::<_, std::io::Error>(is_yes(&answer))
    })
    .await
    .context("the confirmation prompt failed")?
    .context("cannot read the answer from standard input")
}

/// `y` or `yes`, in any case; anything else (an empty line included) is no.
fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::capability::NodeCapabilities;
    use mesh_core::Fingerprint;

    fn node(id: u64, health: &str) -> NodeView {
        NodeView {
            id: NodeId(id),
            fingerprint: "SHA256:x".into(),
            addr: format!("10.0.0.{id}:7700"),
            role: "follower".into(),
            health: health.into(),
            last_contact_ms: None,
            drained: false,
            running: 0,
            capabilities: NodeCapabilities::default(),
        }
    }

    #[test]
    fn exec_lines_carry_checked_values() {
        assert_eq!(
            create_line(Duration::from_secs(5400), 3),
            "token create --ttl 5400000ms --uses 3 --json"
        );
        let token = JoinToken::new(
            [0xab; 8],
            [0xcd; 16],
            "10.0.0.1:7700".into(),
            Fingerprint::of_key_blob(b"seed"),
        );
        let (command, shown) = join_line(&token);
        assert_eq!(command, format!("join {} --json", token.encode()));
        assert_eq!(shown, "join <token abababababababab> --json");
        assert!(!shown.contains(&token.secret));
    }

    #[test]
    fn a_bad_token_is_a_usage_error_that_does_not_quote_it() {
        let text = "mesh1-0123456789abcdef.0123456789abcdef0123456789abcdef.nope";
        let e = parse_token(text).unwrap_err();
        assert_eq!(crate::exit_code::exit_status_of(&e), 2);
        assert_eq!(
            e.to_string(),
            "the TOKEN of join is unusable: this is not a Mesh join token (no seed address); \
             create one with `mesh-cli token create` on a node of the mesh"
        );
        assert!(parse_token(" mesh1-zz ").is_err());
    }

    #[test]
    fn remove_refuses_unknown_and_removed_nodes() {
        let nodes = [node(1, "up"), node(2, "down"), node(3, "removed")];
        assert_eq!(removable(&nodes, NodeId(2)).unwrap().addr, "10.0.0.2:7700");
        assert_eq!(
            removable(&nodes, NodeId(3)).unwrap_err().to_string(),
            "node 3 (10.0.0.3:7700) was already removed from the mesh"
        );
        assert_eq!(
            removable(&nodes, NodeId(9)).unwrap_err().to_string(),
            "node 9 is not in the mesh; its nodes are 1, 2 (see `mesh-cli nodes`)"
        );
        assert!(removable(&[], NodeId(1)).is_err());
    }

    #[test]
    fn drain_refuses_unknown_and_removed_nodes() {
        let nodes = [node(1, "up"), node(2, "down"), node(3, "removed")];
        let why = |n: &NodeView| format!("node {} is gone", n.id);
        assert_eq!(member(&nodes, NodeId(2), why).unwrap().id, NodeId(2));
        assert_eq!(
            member(&nodes, NodeId(3), why).unwrap_err().to_string(),
            "node 3 is gone"
        );
        assert_eq!(
            member(&nodes, NodeId(7), why).unwrap_err().to_string(),
            "node 7 is not in the mesh; its nodes are 1, 2 (see `mesh-cli nodes`)"
        );
    }

    #[test]
    fn only_yes_confirms() {
        for a in ["y\n", "Y", " yes \n", "YES"] {
            assert!(is_yes(a), "{a:?}");
        }
        for a in ["", "\n", "n", "no", "yess", "sure"] {
            assert!(!is_yes(a), "{a:?}");
        }
    }
}
