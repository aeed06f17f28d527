//! The admin commands: user keys and their roles (`keys add/remove/list`), the audit
//! trail (`audit`) and snapshots of the replicated state (`snapshot save`). The node
//! checks the role; these check locally what can be checked, ask, and print.

use super::{call, print_json, print_out, remote_error, show, write_file_as, Context, Reply};
use crate::args::KeysCommand;
use crate::connection::Connection;
use anyhow::Context as _;
use mesh_core::access::Role;
use mesh_core::api::{AuditView, KeyView, EXIT_OK};
use mesh_core::identity::public_key::PublicKeyLine;
use mesh_core::{Digest, Fingerprint};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The answer to `keys add`.
#[derive(Deserialize)]
struct KeysAdded {
    added: Vec<String>,
    role: String,
}

/// The answer to `keys remove`.
#[derive(Deserialize)]
struct KeyRemoved {
    removed: String,
}

/// `snapshot save --json`.
#[derive(Serialize)]
struct SnapshotSaved {
    file: String,
    bytes: u64,
    sha256: String,
}

/// Read a public key file for `keys add` and check every line the way the node will
/// (`PublicKeyLine::parse_many`), so that a wrong file is refused here, by line.
pub(super) fn read_public_keys(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the public key file {}", path.display()))?;
    if text.contains("PRIVATE KEY-----") {
        anyhow::bail!(
            "{} is a private key; give the public key, the .pub file beside it (e.g. ~/.ssh/id_ed25519.pub), \
             and keep the private key to yourself",
            path.display()
        );
    }
    check_public_keys(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(text)
}

/// The keys of a public key text, or which line is wrong and why.
fn check_public_keys(text: &str) -> Result<Vec<PublicKeyLine>, String> {
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Err(e) = PublicKeyLine::parse(line) {
            return Err(format!(
                "line {}: {e}; a public key file holds lines like 'ssh-ed25519 AAAA... comment', as \
                 ssh-keygen writes them to FILE.pub",
                i + 1
            ));
        }
    }
    let keys = PublicKeyLine::parse_many(text).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err(
            "holds no public key; give a .pub file written by ssh-keygen (e.g. ~/.ssh/id_ed25519.pub)"
                .into(),
        );
    }
    Ok(keys)
}

/// `keys add FILE --role R`, with the checked text of FILE.
pub(super) async fn keys_add(
    ctx: &Context,
    conn: &Connection,
    text: &str,
    role: Role,
) -> anyhow::Result<()> {
    let r: Reply<KeysAdded> = call(
        conn,
        &format!("keys add --role {role} --json"),
        Some(text.as_bytes().to_vec()),
    )
    .await?;
    show(ctx, &r, || {
        crate::render::keys_added(&r.value.added, &r.value.role)
    })
}

/// `keys remove` and `keys list` (`keys add` reads its file first: see `run`).
pub(super) async fn keys(
    ctx: &Context,
    conn: &Connection,
    command: KeysCommand,
    now_ms: u64,
) -> anyhow::Result<()> {
    match command {
        KeysCommand::Add { .. } => unreachable!("keys add is handled by run"),
        KeysCommand::Remove { fingerprint } => {
            let r: Reply<KeyRemoved> =
                call(conn, &format!("keys remove {fingerprint} --json"), None).await?;
            show(ctx, &r, || {
                format!(
                    "key {} removed; it can no longer use the mesh\n",
                    r.value.removed
                )
            })
        }
        KeysCommand::List => {
            let r: Reply<Vec<KeyView>> = call(conn, "keys list --json", None).await?;
            show(ctx, &r, || crate::render::keys(&r.value, now_ms))
        }
    }
}

/// The exec line of `audit`. `--since` goes as whole milliseconds: one word that the
/// node parses to exactly what was checked here.
fn audit_line(since: Option<Duration>, actor: Option<&Fingerprint>) -> String {
    let mut line = "audit".to_string();
    if let Some(since) = since {
        line.push_str(&format!(" --since {}ms", since.as_millis()));
    }
    if let Some(actor) = actor {
        line.push_str(&format!(" --actor {actor}"));
    }
    line.push_str(" --json");
    line
}

/// `audit [--since D] [--actor FP]`.
pub(super) async fn audit(
    ctx: &Context,
    conn: &Connection,
    since: Option<Duration>,
    actor: Option<&Fingerprint>,
) -> anyhow::Result<()> {
    let r: Reply<Vec<AuditView>> = call(conn, &audit_line(since, actor), None).await?;
    show(ctx, &r, || crate::render::audit(&r.value))
}

/// `snapshot save FILE`: the raw state, written whole or not at all.
pub(super) async fn snapshot_save(
    ctx: &Context,
    conn: &Connection,
    file: &Path,
) -> anyhow::Result<()> {
    let command = "snapshot";
    let out = conn.exec_snapshot(command).await?;
    if out.exit_status != Some(EXIT_OK) {
        return Err(remote_error(&out, command));
    }
    if out.stdout.is_empty() {
        anyhow::bail!(
            "node {} sent an empty snapshot; nothing was written. Is it a mesh-node of the same version?",
            ctx.node
        );
    }
    let digest = Digest::of(&out.stdout);
    write_file_as(file, &out.stdout, true)?;
    let saved = SnapshotSaved {
        file: file.display().to_string(),
        bytes: out.stdout.len() as u64,
        sha256: digest.to_hex(),
    };
    if ctx.json {
        print_json(&saved)
    } else {
        print_out(&format!(
            "saved the snapshot to {} ({} bytes, sha256 {})\n",
            saved.file, saved.bytes, saved.sha256
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD alice@laptop";

    #[test]
    fn public_key_files_are_checked_by_line() {
        let keys = check_public_keys(&format!("# team\n\n{KEY}\n{KEY}\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].comment, "alice@laptop");

        let e = check_public_keys(&format!("{KEY}\n\nssh-ed25519 bm90IGEga2V5\n")).unwrap_err();
        assert!(
            e.starts_with(
                "line 3: the key data of ssh-ed25519 is not valid base64 for that algorithm;"
            ),
            "{e}"
        );
        let e = check_public_keys("hello world\n").unwrap_err();
        assert!(
            e.starts_with("line 1: expected 'ssh-ed25519 AAAA... [comment]'"),
            "{e}"
        );
        let e = check_public_keys("# nothing here\n").unwrap_err();
        assert!(e.starts_with("holds no public key"), "{e}");
    }

    #[test]
    fn a_private_key_or_a_missing_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("id_ed25519");
        std::fs::write(
            &private,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_public_keys(&private).unwrap_err().to_string();
        assert!(e.ends_with("is a private key; give the public key, the .pub file beside it (e.g. ~/.ssh/id_ed25519.pub), and keep the private key to yourself"), "{e}");
        let e = format!(
            "{:#}",
            read_public_keys(&dir.path().join("nope.pub")).unwrap_err()
        );
        assert!(e.starts_with("cannot read the public key file"), "{e}");
        let bad = dir.path().join("bad.pub");
        std::fs::write(&bad, "ssh-ed25519\n").unwrap();
        let e = read_public_keys(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: line 1: ", bad.display())),
            "{e}"
        );
    }

    #[test]
    fn audit_lines_carry_checked_values() {
        let fp = Fingerprint::of_key_blob(b"k");
        assert_eq!(audit_line(None, None), "audit --json");
        assert_eq!(
            audit_line(Some(Duration::from_secs(5400)), Some(&fp)),
            format!("audit --since 5400000ms --actor {fp} --json")
        );
    }
}
