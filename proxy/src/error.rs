//! The library's error: what was being done, to which object, and the cause, as a typed value.
//! Its message carries the cause once (`source()` does not repeat it); [`Error::cause`] gives
//! the cause to code that must tell failures apart. `anyhow` stays at the binary's edge (the
//! command line, the agent's composition, the tools).
use std::{fmt, path::PathBuf};

use aya::maps::MapError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An operation of the library that failed (boxed: a `Result` of it stays small).
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    /// What was being done, naming the object (`attach tc_from_pod to weir1a2b`); empty when
    /// the cause says it all.
    what: String,
    cause: Cause,
}

impl Error {
    fn new(what: String, cause: Cause) -> Self {
        Error(Box::new(Inner { what, cause }))
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Errno(#[from] nix::errno::Errno),
    #[error(transparent)]
    Ebpf(#[from] aya::EbpfError),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Tc(#[from] aya::programs::tc::TcError),
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    #[error(transparent)]
    Object(#[from] aya_obj::ParseError),
    #[error(transparent)]
    Btf(#[from] btf_rs::Error),
    #[error(transparent)]
    Elf(#[from] object::Error),
    #[error("timed out")]
    Timeout(#[from] tokio::time::error::Elapsed),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error(transparent)]
    InferConfig(#[from] kube::config::InferConfigError),
    /// A nested operation of the library.
    #[error(transparent)]
    Nested(#[from] Box<Error>),
    /// A condition the library checks.
    #[error("{0}")]
    Invalid(String),
    /// Something asked for was not there.
    #[error("missing")]
    Missing,
}

impl Error {
    /// A failed check: `msg` says what is wrong, naming the object.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::new(String::new(), Cause::Invalid(msg.into()))
    }

    pub fn cause(&self) -> &Cause {
        &self.0.cause
    }

    /// The kernel's error number, where the failure was a syscall's.
    pub fn errno(&self) -> Option<i32> {
        match &self.0.cause {
            Cause::Io(e) => e.raw_os_error(),
            Cause::Errno(e) => Some(*e as i32),
            Cause::Write(e) => e.errno(),
            Cause::Nested(e) => e.errno(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Inner { what, cause } = &*self.0;
        match (what.is_empty(), cause) {
            (true, c) => write!(f, "{c}"),
            (false, Cause::Missing) => write!(f, "{what} is missing"),
            (false, c) => write!(f, "{what}: {c}"),
        }
    }
}

impl std::error::Error for Error {}

impl<E: Into<Cause>> From<E> for Error {
    fn from(e: E) -> Self {
        Error::new(String::new(), e.into())
    }
}

/// What an operation was doing when it failed: `.context("…")` and `.with_context(|| …)`, on a
/// `Result` whose error is a [`Cause`] (or converts to one), and on an `Option` (None: missing).
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<W: fmt::Display>(self, what: impl FnOnce() -> W) -> Result<T>;
}

impl<T, E: IntoCause> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::new(what.to_string(), e.into_cause()))
    }

    fn with_context<W: fmt::Display>(self, what: impl FnOnce() -> W) -> Result<T> {
        self.map_err(|e| Error::new(what().to_string(), e.into_cause()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::new(what.to_string(), Cause::Missing))
    }

    fn with_context<W: fmt::Display>(self, what: impl FnOnce() -> W) -> Result<T> {
        self.ok_or_else(|| Error::new(what().to_string(), Cause::Missing))
    }
}

/// An error that can be the cause of an [`Error`]: any [`Cause`], and an [`Error`] itself
/// (nested, so that both operations are named).
pub trait IntoCause {
    fn into_cause(self) -> Cause;
}

impl<E: Into<Cause>> IntoCause for E {
    fn into_cause(self) -> Cause {
        self.into()
    }
}

impl IntoCause for Error {
    fn into_cause(self) -> Cause {
        Cause::Nested(Box::new(self))
    }
}

/// Returns early with [`Error::invalid`] of the formatted message.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::invalid(format!($($arg)*)))
    };
}
pub(crate) use fail;

/// A map operation that failed (the map writer's, the conntrack walks'), naming the map, the operation and the object. Its message
/// carries the kernel's error (and `source()` does not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("map {map}: {op} {what}: {error}")]
    Map {
        map: &'static str,
        op: &'static str,
        what: String,
        error: Box<MapError>,
    },
    #[error("map {map}: open {path}: {error}")]
    Open {
        map: &'static str,
        path: PathBuf,
        error: Box<MapError>,
    },
}

impl WriteError {
    /// The kernel's error number, where the failure was a syscall's.
    pub fn errno(&self) -> Option<i32> {
        let (WriteError::Map { error, .. } | WriteError::Open { error, .. }) = self;
        match &**error {
            MapError::SyscallError(e) => e.io_error.raw_os_error(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_printed_once_and_each_operation_named() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e: Result<()> = Err(io).context("open /sys/fs/bpf/weir/maps/LB_SVC_V1");
        let e = e.context("load the eBPF object").unwrap_err();
        let text = e.to_string();
        assert_eq!(
            text,
            "load the eBPF object: open /sys/fs/bpf/weir/maps/LB_SVC_V1: No such file or directory (os error 2)"
        );
        assert_eq!(text.matches("No such file").count(), 1);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        // As anyhow prints a chain at the edge: the same, once.
        assert_eq!(format!("{:#}", anyhow::Error::from(e)), text);
        // A map error, as the map writer reports it, under an operation of the agent.
        let w = WriteError::Map {
            map: "LB_SVC_V1",
            op: "insert",
            what: "198.19.0.10:80/TCP slot 0".into(),
            error: Box::new(aya::maps::MapError::KeyNotFound),
        };
        let alone = "map LB_SVC_V1: insert 198.19.0.10:80/TCP slot 0: key not found";
        let w2 = WriteError::Map {
            map: "LB_SVC_V1",
            op: "insert",
            what: "198.19.0.10:80/TCP slot 0".into(),
            error: Box::new(aya::maps::MapError::KeyNotFound),
        };
        assert_eq!(format!("{:#}", anyhow::Error::from(w2)), alone);
        let e = format!(
            "{:#}",
            anyhow::Error::from(Err::<(), _>(w).context("sync").unwrap_err())
        );
        assert_eq!(
            e,
            "sync: map LB_SVC_V1: insert 198.19.0.10:80/TCP slot 0: key not found"
        );
        let missing: Result<u8> = None.context("program tc_from_pod");
        assert_eq!(
            missing.unwrap_err().to_string(),
            "program tc_from_pod is missing"
        );
    }
}
