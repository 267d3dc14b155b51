//! A YAML file as the source (the sandbox, `weir dns`, a standalone agent): read whole each time
//! it changes, and applied only when the whole of it parses.
use std::{fs, path::Path, time::SystemTime};

use crate::error::{Context, Error, Result};

use crate::model::{self, Objects, Problem};

/// What tells one version of a file from the next: its modification time and length.
pub type Stamp = Option<(SystemTime, u64)>;

/// The file's stamp now (None: it cannot be read).
pub fn stamp(p: &Path) -> Stamp {
    fs::metadata(p)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// The objects of the file at `path`, and the problems of single objects in it. A file that is
/// not YAML is an error, and nothing of it is to be applied.
pub fn read(path: &Path) -> Result<(Objects, Vec<Problem>)> {
    let text =
        fs::read_to_string(path).with_context(|| format!("read source {}", path.display()))?;
    model::parse_stream(&text).map_err(|p| {
        Error::invalid(format!(
            "source {}: {p}; nothing of it applied, what is programmed stays",
            path.display()
        ))
    })
}
