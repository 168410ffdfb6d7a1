//! `snapshot save|status|restore`. Save streams into `FILE.part`, checks the SHA-256
//! trailer as the bytes arrive, and renames only a verified file into place.
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use mesh_core::client::Client;
use mesh_core::server::{self, ServerConfig};
use mesh_core::snapshot::Verifier;

use crate::cli::RestoreArgs;
use crate::config::Global;
use crate::output::{self, Format};

pub async fn save(global: &Global, out: &mut dyn Write, file: &Path) -> Result<()> {
    if global.client.endpoints.len() != 1 {
        bail!("snapshot must be requested to one selected node, not multiple");
    }
    let client = Client::connect(global.client.clone())?;
    let part = file.with_extension(match file.extension() {
        Some(ext) => format!("{}.part", ext.to_string_lossy()),
        None => "part".to_string(),
    });
    let result = download(&client, &part).await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, file)
        .with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    writeln!(out, "Snapshot saved at {}", file.display())?;
    Ok(out.flush()?)
}

/// Streams the snapshot into `part` (fsync'ed) and verifies its checksum.
async fn download(client: &Client, part: &Path) -> Result<()> {
    let mut stream = client.snapshot().await?;
    let mut f =
        std::fs::File::create(part).with_context(|| format!("cannot create {}", part.display()))?;
    let mut verifier = Verifier::default();
    let mut bar: Option<indicatif::ProgressBar> = None;
    while let Some(msg) = stream.message().await? {
        let bar = bar.get_or_insert_with(|| progress(msg.remaining_bytes + msg.blob.len() as u64));
        f.write_all(&msg.blob)
            .with_context(|| format!("cannot write {}", part.display()))?;
        verifier.update(&msg.blob);
        bar.inc(msg.blob.len() as u64);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    f.sync_all()
        .with_context(|| format!("cannot sync {}", part.display()))?;
    verifier
        .finish()
        .context("the snapshot received is damaged or incomplete")?;
    Ok(())
}

/// A byte progress bar on a terminal; hidden otherwise (scripts, tests).
fn progress(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

pub fn status(out: &mut dyn Write, f: Format, file: &Path) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let status = mesh_core::snapshot::status(&bytes)
        .with_context(|| format!("{} is not a valid snapshot", file.display()))?;
    output::maintenance::snapshot_status(out, f, &status)?;
    Ok(out.flush()?)
}

pub fn restore(out: &mut dyn Write, a: &RestoreArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut cfg = ServerConfig::new(&a.name);
    cfg.data_dir = a.data_dir.clone();
    cfg.initial_cluster_token = a.initial_cluster_token.clone();
    cfg.initial_cluster = a
        .initial_cluster
        .as_deref()
        .map(server::parse_initial_cluster)
        .transpose()?;
    cfg.advertise_mesh = a.mesh_addr.clone();
    let r = server::restore(&cfg, &bytes, a.skip_hash_check)?;
    writeln!(
        out,
        "Restored snapshot {} (revision {}) into {}: member {:x} of new cluster {:x}",
        a.file.display(),
        r.revision,
        a.data_dir.display(),
        r.member_id,
        r.cluster_id
    )?;
    Ok(out.flush()?)
}
