//! Opening the maps pinned under `<bpffs>/weir/maps`, and the errors of single map operations,
//! each naming the map, the operation and the object.
use std::path::Path;

use aya::maps::{Map, MapData, MapError};

use crate::error::WriteError;

fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, WriteError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| WriteError::Open {
        map: name,
        path: path.clone(),
        error: Box::new(source),
    })?;
    Map::from_map_data(data).map_err(|source| WriteError::Open {
        map: name,
        path,
        error: Box::new(source),
    })
}

/// Opens the map pinned at `dir/name` as a typed aya map (`HashMap`, `Array`, ...).
pub fn open_typed<T>(dir: &Path, name: &'static str) -> Result<T, WriteError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(open_pinned(dir, name)?).map_err(|source| WriteError::Open {
        map: name,
        path: dir.join(name),
        error: Box::new(source),
    })
}

/// The error of one map operation, naming the map, the operation and the object.
pub fn failed(
    map: &'static str,
    op: &'static str,
    what: String,
) -> impl FnOnce(MapError) -> WriteError {
    move |source| WriteError::Map {
        map,
        op,
        what,
        error: Box::new(source),
    }
}

/// A deletion of a key already gone is no failure.
pub fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
