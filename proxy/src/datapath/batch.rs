//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_DELETE_BATCH`, which aya 0.14 does not have: a syscall
//! per few thousand entries of a hash map instead of two per entry.
use std::io;

use aya::maps::{MapData, MapError};

use crate::error::WriteError;

/// `BPF_MAP_LOOKUP_BATCH`'s attributes (`union bpf_attr`, the `batch` member).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// One `bpf(cmd, attr)` call of the batch family.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller vouches for the attribute's pointers; its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A batched operation on a conntrack map that failed.
pub(super) fn batch_failed(
    map: &'static str,
    op: &'static str,
    what: &str,
    io_error: io::Error,
) -> WriteError {
    WriteError::Map {
        map,
        op,
        what: what.into(),
        error: Box::new(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf",
            io_error,
        })),
    }
}
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Deletes `keys` from a hash map with `BPF_MAP_DELETE_BATCH`, a key already gone skipped;
/// returns how many it deleted, or `None` when the kernel does not batch this map.
pub fn delete_batched<K: aya::Pod>(map: &MapData, keys: &[K]) -> io::Result<Option<usize>> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut at = 0;
    let mut deleted = 0;
    while at < keys.len() {
        let rest = &keys[at..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len().min(u32::MAX as usize) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` holds `count` keys and outlives the call.
        let r = unsafe { bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) };
        // `count`: the keys deleted before the call stopped.
        deleted += attr.count as usize;
        at += attr.count as usize;
        let Err(err) = r else {
            continue;
        };
        match err.raw_os_error() {
            // Gone meanwhile (expired, or an LRU eviction): past it.
            Some(libc::ENOENT) => at += 1,
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524) if deleted == 0 => {
                return Ok(None)
            }
            _ => return Err(err),
        }
    }
    Ok(Some(deleted))
}

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH`: a syscall per few thousand
/// entries, where iterating costs two per entry (a walk of 100 000 flows took a fifth of a
/// second, on the agent's sync step), each handed to `f` as its batch arrives (a full map is
/// never copied whole). `Ok(false)` when the kernel does not batch this map (`f` not called).
pub fn dump_batched<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    mut f: impl FnMut(K, V),
) -> io::Result<bool> {
    use std::os::fd::{AsFd, AsRawFd};
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut chunk = 4096usize;
    let (mut keys, mut values) = (vec![0u8; chunk * ks], vec![0u8; chunk * vs]);
    // The position between calls: a bucket index for hash maps; room for a key, to be safe.
    let (mut token, mut next) = (vec![0u8; ks.max(8)], vec![0u8; ks.max(8)]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute's buffers hold `count` keys and values and a position each,
        // and outlive the call.
        let err = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                for i in 0..attr.count as usize {
                    // SAFETY: the kernel wrote `count` whole keys and values; Pod types are
                    // valid for any bytes.
                    let (k, v) = unsafe {
                        (
                            std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()),
                            std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()),
                        )
                    };
                    f(k, v);
                }
                if err.is_some() {
                    return Ok(true);
                }
                std::mem::swap(&mut token, &mut next);
                first = false;
            }
            // A bucket holds more entries than the buffers: larger ones, same position.
            Some(libc::ENOSPC) => {
                chunk *= 2;
                keys.resize(chunk * ks, 0);
                values.resize(chunk * vs, 0);
            }
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */) if first => {
                return Ok(false)
            }
            _ => return Err(err.unwrap_or_else(|| io::Error::other("batch lookup"))),
        }
    }
}
