//! What every subcommand writes and parses the same way: files written atomically, standard output that
//! tolerates a closed pipe, token-id lists, the default thread count.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Writes `data` to a temporary file beside `path`, then renames it into place: never half-written.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Prints to stdout; a closed pipe (`q3c ir ... | head`) is not an error.
pub fn print_stdout(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    print_stdout(&format!("{}\n", serde_json::to_string(value)?))
}

/// Parses `1,2,3` into token ids.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--prompt-ids: '{s}' is not a token id"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--prompt-ids: give at least one token id, e.g. --prompt-ids 1,2,3");
    }
    Ok(ids)
}

/// All cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
