//! Unix socket pairs: who is connected to whom (`sock_diag`), what is queued in them (peeked
//! without consuming), and how to make them again.
//!
//! A socket cannot be reopened through `/proc/PID/fd` as a pipe can, so the dumper takes its
//! own reference with `pidfd_getfd` (the same open file, not a new one) and peeks the receive
//! queue from there with `SO_PEEK_OFF`, which it puts back afterwards. Peers come from
//! `NETLINK_SOCK_DIAG` (`UDIAG_SHOW_PEER`), the interface `ss -x` uses.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// What `sock_diag` says about one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: u8,
    /// `TCP_ESTABLISHED`, `TCP_LISTEN`, ... (as the kernel names unix states).
    pub state: u8,
    /// Inode of the peer, 0 if none.
    pub peer: u64,
    /// Bound address (path or abstract name), empty if unnamed.
    pub name: Vec<u8>,
    /// `sk_shutdown`: bit 0 = receive side shut down, bit 1 = send side.
    pub shutdown: u8,
    /// For a listening socket, the connections not accepted yet (`UNIX_DIAG_RQLEN`).
    pub pending: u32,
    /// For a listening socket, the backlog.
    pub backlog: u32,
}

/// `TCP_LISTEN`, as the kernel names a listening unix socket's state.
pub const LISTEN: u8 = 10;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
const NLMSG_HDR: usize = 16;

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Sends one `NETLINK_SOCK_DIAG` dump request (`req`: the request after the netlink header)
/// and hands each answer's payload to `each`.
fn sock_diag(req: &[u8], mut each: impl FnMut(&[u8]) -> Result<(), Errno>) -> Result<(), Errno> {
    // SAFETY: socket takes only integers; a non-negative result is a new descriptor we own.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let nl = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut msg = Vec::with_capacity(NLMSG_HDR + req.len());
    msg.extend_from_slice(&((NLMSG_HDR + req.len()) as u32).to_le_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_le_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes()); // seq
    msg.extend_from_slice(&0u32.to_le_bytes()); // pid
    msg.extend_from_slice(req);
    nix::unistd::write(&nl, &msg)?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = loop {
            match nix::unistd::read(&nl, &mut buf) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Err(Errno::EPROTO);
        }
        let mut off = 0;
        while off + NLMSG_HDR <= n {
            let len = le32(&buf[off..]) as usize;
            let ty = le16(&buf[off + 4..]);
            if len < NLMSG_HDR || off + len > n {
                return Err(Errno::EPROTO);
            }
            let msg = &buf[off + NLMSG_HDR..off + len];
            off += (len + 3) & !3;
            match ty as i32 {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let e = msg.get(..4).map(|b| le32(b) as i32).unwrap_or(0);
                    return Err(Errno::from_raw(-e));
                }
                _ => each(msg)?,
            }
        }
    }
}

/// Every unix socket of the caller's network namespace, by inode.
pub fn unix_sockets() -> Result<BTreeMap<u64, UnixDiag>, Errno> {
    // unix_diag_req.
    let mut req = Vec::with_capacity(24);
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_le_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_le_bytes()); // udiag_states: all
    req.extend_from_slice(&0u32.to_le_bytes()); // udiag_ino
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_le_bytes());
    req.extend_from_slice(&[0xff; 8]); // udiag_cookie: INET_DIAG_NOCOOKIE
    let mut out = BTreeMap::new();
    sock_diag(&req, |msg| {
        // unix_diag_msg: family, type, state, pad, ino (u32), cookie (2 x u32).
        if msg.len() < 16 {
            return Err(Errno::EPROTO);
        }
        let ino = le32(&msg[4..]) as u64;
        let mut d = UnixDiag {
            kind: msg[1],
            state: msg[2],
            ..UnixDiag::default()
        };
        let mut a = 16;
        while a + 4 <= msg.len() {
            let alen = le16(&msg[a..]) as usize;
            let aty = le16(&msg[a + 2..]);
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            let v = &msg[a + 4..a + alen];
            match aty {
                UNIX_DIAG_NAME => d.name = v.to_vec(),
                UNIX_DIAG_PEER if v.len() >= 4 => d.peer = le32(v) as u64,
                UNIX_DIAG_SHUTDOWN if !v.is_empty() => d.shutdown = v[0],
                UNIX_DIAG_RQLEN if v.len() >= 8 => {
                    d.pending = le32(v);
                    d.backlog = le32(&v[4..]);
                }
                _ => {}
            }
            a += (alen + 3) & !3;
        }
        out.insert(ino, d);
        Ok(())
    })?;
    Ok(out)
}

/// A reference of ours to descriptor `fd` of process `pid` (the same open file:
/// `pidfd_getfd`).
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes only integers.
    let p = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if p < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(p as i32) };
    // SAFETY: pidfd_getfd takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh descriptor (close-on-exec) nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// `getsockopt` of an `int` option.
pub fn getsockopt_int(fd: impl AsFd, level: i32, opt: i32) -> Result<i32, Errno> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`, which is a valid c_int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(v)
}

/// `setsockopt` of an `int` option.
pub fn setsockopt_int(fd: impl AsFd, level: i32, opt: i32, v: i32) -> Result<(), Errno> {
    // SAFETY: the kernel reads one c_int from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `SO_SNDBUF` and `SO_RCVBUF` as the kernel reports them (twice what was asked for).
pub fn buffer_sizes(fd: impl AsFd) -> Result<(u32, u32), Errno> {
    let s = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    let r = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    Ok((s.max(0) as u32, r.max(0) as u32))
}

/// Sets the buffer sizes to what [`buffer_sizes`] reported (the kernel doubles the value
/// given, so half is asked for; `*BUFFORCE` passes the sysctl limits, as the program may have
/// had them raised by a privileged helper).
pub fn set_buffer_sizes(fd: impl AsFd, snd: u32, rcv: u32) -> Result<(), Errno> {
    let half = |v: u32| (v / 2).min(i32::MAX as u32) as i32;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, half(snd))?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, half(rcv))
}

/// Why a queue could not be peeked.
#[derive(Debug)]
pub enum PeekError {
    /// A system call failed.
    Sys(&'static str, Errno),
    /// A queued message carries descriptors (`SCM_RIGHTS`).
    Descriptors,
    /// A message did not fit the buffer.
    Truncated,
    /// An empty datagram is queued (it cannot be told from the end of the queue).
    Empty,
}

impl std::fmt::Display for PeekError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeekError::Sys(what, e) => write!(f, "{what}: {e}"),
            PeekError::Descriptors => {
                write!(
                    f,
                    "a queued message carries descriptors (SCM_RIGHTS), which is not supported yet"
                )
            }
            PeekError::Truncated => write!(f, "a queued message is larger than its buffer"),
            PeekError::Empty => write!(f, "an empty message is queued, which is not supported yet"),
        }
    }
}

/// The messages queued for reading on socket `fd`, oldest first, without consuming them (a
/// stream's bytes come in arbitrary pieces). `SO_PEEK_OFF` is set for the walk and put back.
/// `stream` is the socket's type; `rcv_shut` whether its receive side is shut down (then an
/// empty read is the end of the queue).
pub fn peek_queue(
    fd: impl AsFd,
    max_msg: usize,
    stream: bool,
    rcv_shut: bool,
) -> Result<Vec<Vec<u8>>, PeekError> {
    let saved = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| PeekError::Sys("SO_PEEK_OFF", e))?;
    // With SO_PASSCRED every message read comes with credentials, and the end of a shut-down
    // queue without: that tells an empty datagram from the end.
    let passcred = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PASSCRED)
        .map_err(|e| PeekError::Sys("SO_PASSCRED", e))?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
        .map_err(|e| PeekError::Sys("SO_PEEK_OFF", e))?;
    let res = if stream {
        peek_all(&fd, max_msg, stream, rcv_shut)
    } else {
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PASSCRED, 1)
            .map_err(|e| PeekError::Sys("SO_PASSCRED", e))
            .and_then(|()| peek_all(&fd, max_msg, stream, rcv_shut))
    };
    let back = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, saved).and_then(|()| {
        if stream {
            Ok(())
        } else {
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PASSCRED, passcred)
        }
    });
    let out = res?;
    back.map_err(|e| PeekError::Sys("restoring SO_PEEK_OFF/SO_PASSCRED", e))?;
    Ok(out)
}

fn peek_all(
    fd: impl AsFd,
    max_msg: usize,
    stream: bool,
    rcv_shut: bool,
) -> Result<Vec<Vec<u8>>, PeekError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; max_msg.max(4096)];
    // Room for credentials (SO_PASSCRED) and a few descriptors, which are then refused.
    let mut ctl = [0u64; 64];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&ctl);
        // SAFETY: every pointer in `msg` is valid for the lengths given for the whole call.
        let n = unsafe {
            libc::recvmsg(
                fd.as_fd().as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            match Errno::last() {
                Errno::EAGAIN => return Ok(out),
                Errno::EINTR => continue,
                e => return Err(PeekError::Sys("recvmsg(MSG_PEEK)", e)),
            }
        }
        let (mut rights, mut creds) = (false, false);
        // SCM_PIDFD (SO_PASSPIDFD on the receiver): a pidfd installed in us with each peek.
        const SCM_PIDFD: libc::c_int = 0x04;
        // SAFETY: the CMSG_* walk stays within `msg.msg_control`/`msg_controllen` as the
        // kernel filled them; descriptors found are ours and closed here.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET {
                    let ty = (*c).cmsg_type;
                    if ty == libc::SCM_RIGHTS || ty == SCM_PIDFD {
                        rights |= ty == libc::SCM_RIGHTS;
                        let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                        let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                        for i in 0..count {
                            libc::close(data.add(i).read_unaligned());
                        }
                    }
                    creds |= ty == libc::SCM_CREDENTIALS;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if rights || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(PeekError::Descriptors);
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(PeekError::Truncated);
        }
        if n == 0 {
            // The end (a stream, or a shut-down receive side, reads 0 forever once empty:
            // no credentials, as no message was read), or an empty datagram, which a peek
            // offset cannot step over.
            if stream || (rcv_shut && !creds) {
                return Ok(out);
            }
            return Err(PeekError::Empty);
        }
        out.push(buf[..n as usize].to_vec());
    }
}

/// A new connected pair of unix sockets of type `kind` (close-on-exec).
pub fn socketpair(kind: i32) -> Result<(OwnedFd, OwnedFd), Errno> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: the kernel writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: two fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `msgs` from `from`, one `send` per message (a stream gets them as one byte
/// sequence), never blocking.
pub fn send_all(from: impl AsFd, msgs: &[Vec<u8>], stream: bool) -> Result<(), Errno> {
    for m in msgs {
        let mut off = 0;
        loop {
            // SAFETY: the pointer and length describe a live slice.
            let n = unsafe {
                libc::send(
                    from.as_fd().as_raw_fd(),
                    m[off..].as_ptr().cast(),
                    m.len() - off,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(e),
                }
            }
            off += n as usize;
            if off >= m.len() {
                break;
            }
            if !stream {
                return Err(Errno::EMSGSIZE);
            }
        }
    }
    Ok(())
}

/// `shutdown(fd, how)`.
pub fn shutdown(fd: impl AsFd, how: i32) -> Result<(), Errno> {
    // SAFETY: shutdown takes only integers.
    if unsafe { libc::shutdown(fd.as_fd().as_raw_fd(), how) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The backlog of the listening TCP socket with inode `ino` (`AF_INET` or `AF_INET6`), from
/// `NETLINK_SOCK_DIAG` (`idiag_wqueue` is `sk_max_ack_backlog` for a listener; `/proc/net/tcp`
/// does not show it).
pub fn tcp_listen_backlog(family: i32, ino: u64) -> Result<Option<u32>, Errno> {
    // inet_diag_req_v2: family, protocol, ext, pad, states, a zeroed sockid.
    let mut req = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&(1u32 << LISTEN).to_le_bytes());
    req.extend_from_slice(&[0u8; 48]);
    let mut found = None;
    sock_diag(&req, |msg| {
        // inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue,
        // wqueue, uid, inode.
        if msg.len() < 72 {
            return Err(Errno::EPROTO);
        }
        if le32(&msg[68..]) as u64 == ino {
            found = Some(le32(&msg[60..]));
        }
        Ok(())
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diag_sees_a_pair_and_peek_leaves_the_queue() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = socketpair(libc::SOCK_SEQPACKET).expect("socketpair");
        let ino = |fd: &OwnedFd| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .expect("stat")
                .ino()
        };
        let (ia, ib) = (ino(&a), ino(&b));
        let all = match unix_sockets() {
            Ok(all) => all,
            Err(e) => {
                eprintln!("skipping: NETLINK_SOCK_DIAG: {e}");
                return;
            }
        };
        assert_eq!(all[&ia].peer, ib);
        assert_eq!(all[&ib].peer, ia);
        assert_eq!(all[&ia].kind as i32, libc::SOCK_SEQPACKET);
        assert!(all[&ia].name.is_empty());
        let msgs = vec![b"one".to_vec(), b"two".to_vec(), vec![7u8; 70_000]];
        send_all(&b, &msgs, false).expect("send");
        shutdown(&b, libc::SHUT_WR).expect("shutdown");
        assert_eq!(peek_queue(&a, 1 << 17, false, true).expect("peek"), msgs);
        // Peeking twice gives the same (nothing consumed, SO_PEEK_OFF put back).
        assert_eq!(peek_queue(&a, 1 << 17, false, true).expect("peek"), msgs);
        assert!(matches!(
            peek_queue(&a, 1 << 10, false, true),
            Err(PeekError::Truncated)
        ));
        assert_eq!(
            getsockopt_int(&a, libc::SOL_SOCKET, libc::SO_PEEK_OFF).expect("get"),
            -1
        );
        assert_eq!(
            getsockopt_int(&a, libc::SOL_SOCKET, libc::SO_PASSCRED).expect("get"),
            0
        );
        let all = unix_sockets().expect("diag");
        assert_eq!(all[&ib].shutdown & 2, 2, "send side of b shut down");
        assert_eq!(all[&ia].shutdown & 1, 1, "receive side of a shut down");
        let mut got = [0u8; 16];
        let n = nix::unistd::read(&a, &mut got).expect("read");
        assert_eq!(&got[..n], b"one");
        // An empty message cannot be stepped over by a peek offset: refused, not dropped,
        // also where the queue ends in a shutdown (told apart from the end by the
        // credentials SO_PASSCRED attaches to every message read).
        let (g, h) = socketpair(libc::SOCK_SEQPACKET).expect("socketpair");
        send_all(&h, &[b"a".to_vec(), Vec::new(), b"c".to_vec()], false).expect("send");
        shutdown(&h, libc::SHUT_WR).expect("shutdown");
        assert!(matches!(
            peek_queue(&g, 4096, false, true),
            Err(PeekError::Empty)
        ));
        // An empty datagram on an open socket cannot be stepped over: refused, not dropped.
        let (c, d) = socketpair(libc::SOCK_DGRAM).expect("socketpair");
        send_all(&d, &[b"x".to_vec(), Vec::new()], false).expect("send");
        assert!(matches!(
            peek_queue(&c, 4096, false, false),
            Err(PeekError::Empty)
        ));
        // A stream's bytes, however they were written.
        let (e, f) = socketpair(libc::SOCK_STREAM).expect("socketpair");
        set_buffer_sizes(&f, 4 << 20, 4 << 20).expect("SO_SNDBUFFORCE");
        send_all(&f, &[vec![1u8; 300_000]], true).expect("send");
        let got: Vec<u8> = peek_queue(&e, 65536, true, false).expect("peek").concat();
        assert_eq!(got, vec![1u8; 300_000]);
    }
}
