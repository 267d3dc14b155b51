//! Address allocation: one file per allocated address, named by the address and holding its
//! owner (`containerID` and `ifname`), in `<dataDir>/<network>/`, as host-local keeps them.
//!
//! Every change happens under an exclusive `flock` on `<dir>/lock`, so concurrent plugin calls
//! on one node serialise. A record is written to a temporary file and renamed into place: a
//! crash leaves either no record or a whole one, never a half-written owner.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    config::{ip, u, valid_container_id, valid_ifname, Attachment, Range, RangeSet},
    error::{code, io, CniError, Result},
};

pub struct Store {
    dir: PathBuf,
}

/// An address [`Locked::allocate`] gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// The owner held it already.
    Held(IpAddr),
    /// Allocated by this call.
    New(IpAddr),
}

impl Got {
    pub fn addr(self) -> IpAddr {
        match self {
            Got::Held(a) | Got::New(a) => a,
        }
    }
}

/// The store with its lock held; dropping it releases the lock.
pub struct Locked<'a> {
    store: &'a Store,
    _lock: Flock<fs::File>,
}

impl Store {
    pub fn new(data_dir: &Path, network: &str) -> Result<Store> {
        if network.contains('/') || network.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network name {network:?} cannot name a directory"),
            ));
        }
        Ok(Store {
            dir: data_dir.join(network),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock(&self) -> Result<Locked<'_>> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| io(format!("create IPAM directory {}", self.dir.display()), e))?;
        let path = self.dir.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(format!("open {}", path.display()), e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::new(code::IO, format!("lock {}: {e}", path.display())))?;
        Ok(Locked {
            store: self,
            _lock: lock,
        })
    }
}

/// A record's content: the container id and the interface name, one line each. Both were
/// validated (`config::valid_container_id`, `config::valid_ifname`: no whitespace, no line
/// break), so the text names one owner only.
fn owner_text(a: &Attachment) -> String {
    format!("{}\n{}\n", a.container_id, a.ifname)
}

/// The owner a record's text names, read exactly as written: a record that is not two valid
/// lines names no owner (and its address stays taken; see [`Scan::unreadable`]).
fn parse_owner(text: &str) -> Option<Attachment> {
    let (container_id, rest) = text.split_once('\n')?;
    let ifname = rest.strip_suffix('\n')?;
    let a = Attachment {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    (valid_container_id(&a.container_id) && valid_ifname(&a.ifname)).then_some(a)
}

/// What the store holds.
#[derive(Debug, Default)]
pub struct Scan {
    /// Address → owner.
    pub owned: BTreeMap<IpAddr, Attachment>,
    /// Records whose owner cannot be read (written by hand, or by a version that took ids
    /// with whitespace): their addresses are never handed out, and only a person removes them.
    pub unreadable: Vec<PathBuf>,
}

impl Scan {
    fn used(&self) -> BTreeSet<IpAddr> {
        let unreadable = self
            .unreadable
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse::<IpAddr>().ok());
        self.owned.keys().copied().chain(unreadable).collect()
    }
}

impl Locked<'_> {
    fn record(&self, a: IpAddr) -> PathBuf {
        self.store.dir.join(a.to_string())
    }

    /// Every record: address → owner, and those that name no owner.
    pub fn scan(&self) -> Result<Scan> {
        let mut out = Scan::default();
        let dir = &self.store.dir;
        let entries = fs::read_dir(dir).map_err(|e| io(format!("read {}", dir.display()), e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(addr) = name.parse::<IpAddr>() else {
                // A temporary file of a write that crashed: no record was made.
                if name.starts_with(".tmp-") {
                    let _ = fs::remove_file(e.path());
                }
                continue;
            };
            match fs::read_to_string(e.path())
                .ok()
                .as_deref()
                .and_then(parse_owner)
            {
                Some(owner) => {
                    out.owned.insert(addr, owner);
                }
                None => out.unreadable.push(e.path()),
            }
        }
        Ok(out)
    }

    /// Every allocation with a readable owner: address → owner.
    pub fn records(&self) -> Result<BTreeMap<IpAddr, Attachment>> {
        Ok(self.scan()?.owned)
    }

    /// The addresses `owner` holds.
    pub fn held_by(&self, owner: &Attachment) -> Result<Vec<IpAddr>> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|(_, o)| o == owner)
            .map(|(a, _)| a)
            .collect())
    }

    /// One address from `set` for `owner`: the one it holds already (`Held`), or the next
    /// free one after the last handed out, so that a released address is not reused at once
    /// (`New`). Only a `New` address is this call's to give back.
    pub fn allocate(&self, set_index: usize, set: &RangeSet, owner: &Attachment) -> Result<Got> {
        let scan = self.scan()?;
        if let Some((a, _)) = scan
            .owned
            .iter()
            .find(|(a, o)| *o == owner && set.iter().any(|r| in_range(r, **a)))
        {
            return Ok(Got::Held(*a));
        }
        let used = scan.used();
        let last_file = self.store.dir.join(format!("last_reserved_ip.{set_index}"));
        let last: Option<IpAddr> = fs::read_to_string(&last_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let Some(a) = next_free(set, last, &used) else {
            return Err(CniError::new(
                code::EXHAUSTED,
                format!(
                    "no free address in {}: all {} are allocated",
                    describe(set),
                    set.iter().map(size).sum::<u128>()
                ),
            )
            .details(format!("allocations are in {}", self.store.dir.display())));
        };
        self.write_atomic(&self.record(a), owner_text(owner).as_bytes())?;
        self.write_atomic(&last_file, a.to_string().as_bytes())?;
        Ok(Got::New(a))
    }

    /// Whether every set still has a free address (STATUS).
    pub fn exhausted(&self, sets: &[RangeSet]) -> Result<Option<String>> {
        let used = self.scan()?.used();
        Ok(sets
            .iter()
            .find(|set| next_free(set, None, &used).is_none())
            .map(describe))
    }

    /// Releases every address of `owner`; returns them.
    pub fn release(&self, owner: &Attachment) -> Result<Vec<IpAddr>> {
        let held = self.held_by(owner)?;
        self.remove(&held)?;
        Ok(held)
    }

    /// Gives back what one ADD allocated: each of `addrs` that `owner` still holds, and no
    /// other (an address `owner` held before that ADD stays with it).
    pub fn release_new(&self, owner: &Attachment, addrs: &[IpAddr]) -> Result<()> {
        let held = self.held_by(owner)?;
        let mine: Vec<IpAddr> = addrs.iter().filter(|a| held.contains(a)).copied().collect();
        self.remove(&mine)
    }

    fn remove(&self, addrs: &[IpAddr]) -> Result<()> {
        for a in addrs {
            let p = self.record(*a);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("remove {}", p.display()), e)),
            }
        }
        Ok(())
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.store.dir.join(format!(".tmp-{name}"));
        // No fsync: the rename makes a record whole or absent if the plugin dies. After a power
        // loss every pod of the node is gone too; a record that did not reach the disk then
        // names no running pod, and one that did is reclaimed by DEL or GC.
        let write = || -> std::io::Result<()> {
            fs::File::create(&tmp)?.write_all(data)?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| io(format!("write {}", path.display()), e))
    }
}

fn in_range(r: &Range, a: IpAddr) -> bool {
    a.is_ipv4() == r.start.is_ipv4() && (u(r.start)..=u(r.end)).contains(&u(a))
}

fn size(r: &Range) -> u128 {
    u(r.end) - u(r.start) + 1
}

fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first free address after `last` (wrapping), visiting each address of the set at most
/// once. The walk stops at the first free one, so it takes at most one step per used address.
fn next_free(set: &RangeSet, last: Option<IpAddr>, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let total: u128 = set.iter().map(size).sum();
    // Position of an address in the concatenation of the ranges.
    let pos_of = |a: IpAddr| -> Option<u128> {
        let mut base = 0;
        for r in set {
            if in_range(r, a) {
                return Some(base + u(a) - u(r.start));
            }
            base += size(r);
        }
        None
    };
    let at = |mut p: u128| -> IpAddr {
        for r in set {
            if p < size(r) {
                return ip(u(r.start) + p, r.start.is_ipv4());
            }
            p -= size(r);
        }
        unreachable!("position within the total size")
    };
    let start = last.and_then(pos_of).map(|p| (p + 1) % total).unwrap_or(0);
    let mut p = start;
    for _ in 0..total {
        let a = at(p);
        let reserved = set.iter().any(|r| r.reserved == Some(a));
        if !reserved && !used.contains(&a) {
            return Some(a);
        }
        p = (p + 1) % total;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetConf;

    fn sets(json_ranges: &str) -> Vec<RangeSet> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.1.0","name":"n","ipam":{{"ranges":{json_ranges}}}}}"#)
                .as_bytes(),
        )
        .unwrap()
        .range_sets()
        .unwrap()
    }

    fn owner(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocates_in_order_skips_the_gateway_and_does_not_reuse_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), "net").unwrap();
        let set = &sets(r#"[[{"subnet":"198.18.1.0/29","gateway":"198.18.1.2"}]]"#)[0];
        let l = store.lock().unwrap();
        let a = l.allocate(0, set, &owner("a")).unwrap();
        let b = l.allocate(0, set, &owner("b")).unwrap();
        assert_eq!(
            (a, b),
            (
                Got::New("198.18.1.1".parse().unwrap()),
                Got::New("198.18.1.3".parse().unwrap())
            )
        );
        // The same owner asking again gets the address it holds.
        assert_eq!(
            l.allocate(0, set, &owner("a")).unwrap(),
            Got::Held(a.addr())
        );
        assert_eq!(l.release(&owner("a")).unwrap(), vec![a.addr()]);
        let c = l.allocate(0, set, &owner("c")).unwrap();
        assert_eq!(c.addr().to_string(), "198.18.1.4");
        assert!(l.held_by(&owner("a")).unwrap().is_empty());
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_status_sees_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), "net").unwrap();
        let all = sets(r#"[[{"subnet":"198.18.1.0/30"}]]"#);
        let l = store.lock().unwrap();
        l.allocate(0, &all[0], &owner("a")).unwrap();
        assert_eq!(l.exhausted(&all).unwrap(), None);
        l.allocate(0, &all[0], &owner("b")).unwrap();
        let e = l.allocate(0, &all[0], &owner("c")).unwrap_err();
        assert_eq!(e.code, code::EXHAUSTED);
        assert!(e.msg.contains("198.18.1.1-198.18.1.2"), "{e}");
        assert!(l.exhausted(&all).unwrap().is_some());
    }

    #[test]
    fn a_crashed_write_leaves_no_record() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), "net").unwrap();
        let set = &sets(r#"[[{"subnet":"fd00:18::/124"}]]"#)[0];
        let l = store.lock().unwrap();
        fs::write(store.dir().join(".tmp-fd00:18::1"), "half").unwrap();
        assert!(l.records().unwrap().is_empty());
        assert_eq!(
            l.allocate(0, set, &owner("a")).unwrap().addr().to_string(),
            "fd00:18::1"
        );
        assert!(!store.dir().join(".tmp-fd00:18::1").exists());
    }

    #[test]
    fn concurrent_allocations_get_distinct_addresses() {
        let tmp = tempfile::tempdir().unwrap();
        let set = sets(r#"[[{"subnet":"198.18.0.0/24"}]]"#).remove(0);
        let got: Vec<IpAddr> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..64)
                .map(|i| {
                    let (dir, set) = (tmp.path(), &set);
                    s.spawn(move || {
                        let store = Store::new(dir, "net").unwrap();
                        let l = store.lock().unwrap();
                        l.allocate(0, set, &owner(&format!("c{i}"))).unwrap().addr()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: BTreeSet<_> = got.iter().collect();
        assert_eq!(distinct.len(), 64);
    }

    #[test]
    fn an_undo_gives_back_only_what_its_own_allocation_made() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), "net").unwrap();
        let set = &sets(r#"[[{"subnet":"198.18.1.0/29"}]]"#)[0];
        let l = store.lock().unwrap();
        let held = l.allocate(0, set, &owner("a")).unwrap();
        // A second ADD of `a` gets what it holds; undoing it gives back nothing.
        let again = l.allocate(0, set, &owner("a")).unwrap();
        assert_eq!(again, Got::Held(held.addr()));
        l.release_new(&owner("a"), &[]).unwrap();
        assert_eq!(l.held_by(&owner("a")).unwrap(), vec![held.addr()]);
        // An address of another owner named by mistake is not released either.
        let b = l.allocate(0, set, &owner("b")).unwrap();
        l.release_new(&owner("a"), &[b.addr()]).unwrap();
        assert_eq!(l.held_by(&owner("b")).unwrap(), vec![b.addr()]);
    }

    #[test]
    fn owners_are_read_exactly_and_an_unreadable_record_keeps_its_address() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), "net").unwrap();
        let set = &sets(r#"[[{"subnet":"198.18.1.0/30"}]]"#)[0];
        let l = store.lock().unwrap();
        assert_eq!(parse_owner("abc\neth0\n"), Some(owner("abc")));
        for text in [
            "abc \neth0\n",
            " abc\neth0\n",
            "abc\neth0",
            "abc\n\neth0\n",
            "abc\neth0\nx\n",
        ] {
            assert_eq!(parse_owner(text), None, "{text:?}");
        }
        // A record written by hand (or by a version that took ids with whitespace).
        fs::write(store.dir().join("198.18.1.1"), "abc \neth0\n").unwrap();
        let scan = l.scan().unwrap();
        assert!(scan.owned.is_empty());
        assert_eq!(scan.unreadable, vec![store.dir().join("198.18.1.1")]);
        // Its address is not handed out again, and it is still there after a release.
        assert_eq!(
            l.allocate(0, set, &owner("abc"))
                .unwrap()
                .addr()
                .to_string(),
            "198.18.1.2"
        );
        l.release(&owner("abc")).unwrap();
        assert!(store.dir().join("198.18.1.1").exists());
    }
}
