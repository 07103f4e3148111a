//! userfaultfd for hugevisor: a small safe layer over the kernel interface, one job only
//! (no policy). Written over `libc` with the ABI in [`sys`] checked at compile time, so the
//! build needs no bindgen/libclang (the `userfaultfd` crate needs both and lacks MINOR for
//! shmem/hugetlbfs, POISON and MOVE).
//!
//! - [`Uffd::open`]: `userfaultfd(2)` (falling back to `/dev/userfaultfd`) and `UFFDIO_API`
//!   negotiation that names missing features. Never `UFFD_USER_MODE_ONLY`: faults taken
//!   by KVM on behalf of a vCPU must be delivered.
//! - registration in MISSING, MINOR and WP modes; CONTINUE, COPY, ZEROPAGE,
//!   WRITEPROTECT, WAKE, POISON;
//! - events with fault kind, access and the faulting thread id;
//! - [`run_until_stopped`]: a handler loop that polls the uffd and a stop eventfd.

pub mod sys;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

bitflags::bitflags! {
    /// UFFD_FEATURE_* bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        const PAGEFAULT_FLAG_WP = 1 << 0;
        const EVENT_FORK = 1 << 1;
        const EVENT_REMAP = 1 << 2;
        const EVENT_REMOVE = 1 << 3;
        const MISSING_HUGETLBFS = 1 << 4;
        const MISSING_SHMEM = 1 << 5;
        const EVENT_UNMAP = 1 << 6;
        const SIGBUS = 1 << 7;
        const THREAD_ID = 1 << 8;
        const MINOR_HUGETLBFS = 1 << 9;
        const MINOR_SHMEM = 1 << 10;
        const EXACT_ADDRESS = 1 << 11;
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        const WP_UNPOPULATED = 1 << 13;
        const POISON = 1 << 14;
        const WP_ASYNC = 1 << 15;
        const MOVE = 1 << 16;
    }

    /// UFFDIO_REGISTER_MODE_*.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING;
        const WP = sys::UFFDIO_REGISTER_MODE_WP;
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR;
    }
}

impl Features {
    /// The kernel's names of the set bits (without the UFFD_FEATURE_ prefix).
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}

/// Whether a resolving ioctl wakes the faulting threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    Yes,
    /// `*_MODE_DONTWAKE`: wake later with [`Uffd::wake`] (e.g. after several ranges).
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No page in the page cache / page tables (MISSING registration).
    Missing,
    /// The page is in the page cache but not mapped here (MINOR registration).
    Minor,
    /// Write to a write-protected page (WP registration).
    WriteProtect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Pagefault {
        address: u64,
        kind: FaultKind,
        access: Access,
        thread_id: Option<u32>,
    },
    Fork {
        child_fd: i32,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open userfaultfd: {source}; run as root, or set vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd (ENOSYS: the kernel lacks CONFIG_USERFAULTFD)")]
    Open { source: std::io::Error },
    #[error("UFFDIO_API: {source} (EINVAL: a requested feature is unknown to this kernel, or the fd was already negotiated)")]
    Api { source: std::io::Error },
    #[error("this kernel's userfaultfd lacks {}: MINOR faults on shmem need Linux 5.14, on hugetlbfs 5.13, THREAD_ID 4.14", .missing.join(", "))]
    MissingFeatures { missing: Vec<&'static str> },
    #[error("{op} of [{start:#x}, +{len:#x}): {source}{hint}")]
    Ioctl {
        op: &'static str,
        start: u64,
        len: u64,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{op} of [{start:#x}, +{len:#x}): already mapped")]
    AlreadyMapped {
        op: &'static str,
        start: u64,
        len: u64,
    },
    #[error("{op} of [{start:#x}, +{len:#x}): the mapping changed under the operation; retry")]
    Retry {
        op: &'static str,
        start: u64,
        len: u64,
    },
    #[error("reading userfaultfd events: {source}")]
    Read { source: std::io::Error },
    #[error("unknown userfaultfd event {0:#x}")]
    UnknownEvent(u8),
    #[error("eventfd: {source}")]
    EventFd { source: std::io::Error },
    #[error("poll: {source}")]
    Poll { source: std::io::Error },
    #[error(
        "userfaultfd poll reported {revents:#x} (error/hangup); the fd is unusable, open a new one"
    )]
    PollError { revents: i16 },
}

pub struct Uffd {
    fd: OwnedFd,
    features: Features,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn new_fd() -> Result<OwnedFd, Error> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    if fd >= 0 {
        // SAFETY: fd is a fresh descriptor nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let first = std::io::Error::last_os_error();
    // Fallback: /dev/userfaultfd (works where the syscall is restricted to root).
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| Error::Open { source: first })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(Error::Open {
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: &OwnedFd, features: Features) -> Result<sys::uffdio_api, Error> {
    let mut api = sys::uffdio_api {
        api: sys::UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api, which we own.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            sys::UFFDIO_API as _,
            &mut api as *mut sys::uffdio_api,
        )
    };
    if r < 0 {
        return Err(Error::Api {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(api)
}

/// `Err(MissingFeatures)` naming the bits of `required` that `available` lacks.
fn check_features(required: Features, available: Features) -> Result<(), Error> {
    let missing = required.difference(available);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingFeatures {
            missing: missing.names(),
        })
    }
}

impl Uffd {
    /// The features this kernel offers (probed on a throwaway fd: UFFDIO_API is once per fd).
    pub fn available_features() -> Result<Features, Error> {
        let fd = new_fd()?;
        Ok(Features::from_bits_truncate(
            api(&fd, Features::empty())?.features,
        ))
    }

    /// Opens a userfaultfd with `required` features, naming any the kernel lacks.
    pub fn open(required: Features) -> Result<Uffd, Error> {
        check_features(required, Uffd::available_features()?)?;
        let fd = new_fd()?;
        // The kernel answers with *all* the features it offers; only `required` are
        // enabled on this fd (e.g. without THREAD_ID the ptid field stays 0).
        api(&fd, required)?;
        Ok(Uffd {
            fd,
            features: required,
        })
    }

    /// The features negotiated on this fd (exactly those passed to [`Uffd::open`]).
    pub fn features(&self) -> Features {
        self.features
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        nr: u64,
        arg: &mut T,
        start: u64,
        len: u64,
    ) -> Result<(), Error> {
        // SAFETY: each caller passes the ioctl number matching T's layout (checked in
        // `sys`); the kernel reads/writes only that struct, which we own.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr as _, arg as *mut T) };
        if r == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        Err(match source.raw_os_error() {
            Some(libc::EEXIST) => Error::AlreadyMapped { op, start, len },
            Some(libc::EAGAIN) => Error::Retry { op, start, len },
            Some(libc::EINVAL) if op == "UFFDIO_REGISTER" => Error::Ioctl {
                op,
                start,
                len,
                source,
                hint: " (MINOR needs shmem or hugetlbfs memory; ranges must be page aligned, hugetlb ones huge-page aligned)",
            },
            _ => Error::Ioctl { op, start, len, source, hint: "" },
        })
    }

    /// Registers [start, start+len); returns the ioctls the range supports.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<u64, Error> {
        let mut r = sys::uffdio_register {
            range: sys::uffdio_range { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", sys::UFFDIO_REGISTER, &mut r, start, len)?;
        Ok(r.ioctls)
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Error> {
        let mut r = sys::uffdio_range { start, len };
        self.ioctl(
            "UFFDIO_UNREGISTER",
            sys::UFFDIO_UNREGISTER,
            &mut r,
            start,
            len,
        )
    }

    /// Maps the page-cache pages of [start, start+len) (MINOR faults).
    pub fn continue_range(&self, start: u64, len: u64, wake: Wake) -> Result<(), Error> {
        let mode = if wake == Wake::No {
            sys::UFFDIO_CONTINUE_MODE_DONTWAKE
        } else {
            0
        };
        let mut c = sys::uffdio_continue {
            range: sys::uffdio_range { start, len },
            mode,
            mapped: 0,
        };
        self.ioctl("UFFDIO_CONTINUE", sys::UFFDIO_CONTINUE, &mut c, start, len)
    }

    /// Copies `len` bytes from `src` into the missing range at `dst`; returns bytes copied.
    ///
    /// `src` must point at `len` readable bytes (the kernel copies from this process).
    pub fn copy(&self, dst: u64, src: *const u8, len: u64, wake: Wake) -> Result<u64, Error> {
        let mode = if wake == Wake::No {
            sys::UFFDIO_COPY_MODE_DONTWAKE
        } else {
            0
        };
        let mut c = sys::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        self.ioctl("UFFDIO_COPY", sys::UFFDIO_COPY, &mut c, dst, len)?;
        Ok(c.copy.max(0) as u64)
    }

    pub fn zeropage(&self, start: u64, len: u64, wake: Wake) -> Result<u64, Error> {
        let mode = if wake == Wake::No {
            sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
        } else {
            0
        };
        let mut z = sys::uffdio_zeropage {
            range: sys::uffdio_range { start, len },
            mode,
            zeropage: 0,
        };
        self.ioctl("UFFDIO_ZEROPAGE", sys::UFFDIO_ZEROPAGE, &mut z, start, len)?;
        Ok(z.zeropage.max(0) as u64)
    }

    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        prot: Protection,
        wake: Wake,
    ) -> Result<(), Error> {
        let mut mode = if prot == Protection::On {
            sys::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        if wake == Wake::No {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut w = sys::uffdio_writeprotect {
            range: sys::uffdio_range { start, len },
            mode,
        };
        self.ioctl(
            "UFFDIO_WRITEPROTECT",
            sys::UFFDIO_WRITEPROTECT,
            &mut w,
            start,
            len,
        )
    }

    pub fn wake(&self, start: u64, len: u64) -> Result<(), Error> {
        let mut r = sys::uffdio_range { start, len };
        self.ioctl("UFFDIO_WAKE", sys::UFFDIO_WAKE, &mut r, start, len)
    }

    /// Marks [start, start+len) poisoned: accesses get SIGBUS.
    pub fn poison(&self, start: u64, len: u64, wake: Wake) -> Result<u64, Error> {
        let mode = if wake == Wake::No {
            sys::UFFDIO_POISON_MODE_DONTWAKE
        } else {
            0
        };
        let mut p = sys::uffdio_poison {
            range: sys::uffdio_range { start, len },
            mode,
            updated: 0,
        };
        self.ioctl("UFFDIO_POISON", sys::UFFDIO_POISON, &mut p, start, len)?;
        Ok(p.updated.max(0) as u64)
    }

    /// Reads one event without blocking: `Ok(None)` when none is pending.
    pub fn read_event(&self) -> Result<Option<Event>, Error> {
        let mut msg = sys::uffd_msg::default();
        let size = std::mem::size_of::<sys::uffd_msg>();
        // SAFETY: reads at most one uffd_msg into memory we own; the fd is non-blocking.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut sys::uffd_msg).cast(),
                size,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(Error::Read { source: e }),
            };
        }
        if n as usize != size {
            return Err(Error::Read {
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            });
        }
        decode(&msg, self.features).map(Some)
    }
}

fn decode(msg: &sys::uffd_msg, features: Features) -> Result<Event, Error> {
    let [a0, a1, a2] = msg.arg;
    Ok(match msg.event {
        sys::UFFD_EVENT_PAGEFAULT => Event::Pagefault {
            address: a1,
            kind: if a0 & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                FaultKind::Minor
            } else if a0 & sys::UFFD_PAGEFAULT_FLAG_WP != 0 {
                FaultKind::WriteProtect
            } else {
                FaultKind::Missing
            },
            access: if a0 & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0 {
                Access::Write
            } else {
                Access::Read
            },
            thread_id: features.contains(Features::THREAD_ID).then_some(a2 as u32),
        },
        sys::UFFD_EVENT_FORK => Event::Fork {
            child_fd: a0 as u32 as i32,
        },
        sys::UFFD_EVENT_REMAP => Event::Remap {
            from: a0,
            to: a1,
            len: a2,
        },
        sys::UFFD_EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
        sys::UFFD_EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
        other => return Err(Error::UnknownEvent(other)),
    })
}

/// An eventfd that stops [`run_until_stopped`].
pub struct StopFd {
    fd: OwnedFd,
}

impl StopFd {
    pub fn new() -> Result<StopFd, Error> {
        // SAFETY: eventfd(2) returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::EventFd {
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh eventfd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(StopFd { fd })
    }

    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd. A failure (counter overflow)
        // would mean it is already signalled.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl AsRawFd for StopFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Handles events of `uffd` with `on_event` until `stop` is signalled.
pub fn run_until_stopped(
    uffd: &Uffd,
    stop: &StopFd,
    mut on_event: impl FnMut(Event),
) -> Result<(), Error> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two valid fds described by a local array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::Poll { source: e });
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        let bad = fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL);
        if bad != 0 {
            return Err(Error::PollError { revents: bad });
        }
        while let Some(ev) = uffd.read_event()? {
            on_event(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_features_names_exactly_the_missing_bits() {
        let available = Features::all() - Features::MINOR_SHMEM - Features::POISON;
        assert!(check_features(Features::THREAD_ID, available).is_ok());
        assert!(check_features(Features::empty(), Features::empty()).is_ok());
        match check_features(
            Features::THREAD_ID | Features::MINOR_SHMEM | Features::POISON,
            available,
        ) {
            Err(Error::MissingFeatures { missing }) => {
                assert_eq!(missing, vec!["MINOR_SHMEM", "POISON"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn feature_names_cover_bits_0_to_16() {
        assert_eq!(Features::all().bits(), 0x1ffff);
        let names = Features::all().names();
        assert_eq!(names.len(), 17);
        assert_eq!(names[0], "PAGEFAULT_FLAG_WP");
        assert_eq!(names[16], "MOVE");
        // Unknown kernel bits are dropped, not misnamed.
        assert_eq!(
            Features::from_bits_truncate(1 << 40).names(),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn missing_feature_message_names_them() {
        let e = Error::MissingFeatures {
            missing: (Features::MINOR_SHMEM | Features::THREAD_ID).names(),
        };
        let s = e.to_string();
        assert!(s.contains("THREAD_ID") && s.contains("MINOR_SHMEM"), "{s}");
    }

    #[test]
    fn decodes_pagefault_messages() {
        let msg = sys::uffd_msg {
            event: sys::UFFD_EVENT_PAGEFAULT,
            arg: [
                sys::UFFD_PAGEFAULT_FLAG_MINOR | sys::UFFD_PAGEFAULT_FLAG_WRITE,
                0x7000,
                1234,
            ],
            ..Default::default()
        };
        assert_eq!(
            decode(&msg, Features::THREAD_ID).unwrap(),
            Event::Pagefault {
                address: 0x7000,
                kind: FaultKind::Minor,
                access: Access::Write,
                thread_id: Some(1234)
            }
        );
        assert!(matches!(
            decode(&msg, Features::empty()).unwrap(),
            Event::Pagefault {
                thread_id: None,
                ..
            }
        ));
        let bad = sys::uffd_msg {
            event: 0x99,
            ..Default::default()
        };
        assert!(matches!(
            decode(&bad, Features::empty()),
            Err(Error::UnknownEvent(0x99))
        ));
    }
}
