//! A stub resolver: A and AAAA questions over UDP to the configured name
//! servers, answers parsed with every length checked.
//!
//! What must hold: an answer is taken only if it carries our id, answers
//! our question and is not truncated; any malformed byte sequence is an
//! error, never a panic or an out-of-bounds read (tests and a fuzz target
//! feed it garbage); at most [`ANSWERS_MAX`] addresses are taken from one
//! answer. CNAME chains are followed within the answer (the records the
//! server put there); nothing is cached here.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

/// Addresses taken from one answer (a name with more is cut there).
pub const ANSWERS_MAX: usize = 256;
/// The largest UDP answer read (EDNS0's common default; without EDNS a
/// server sends at most 512 bytes and sets TC beyond).
const ANSWER_BYTES_MAX: usize = 4096;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const TYPE_CNAME: u16 = 5;

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no such name")]
    NoSuchName,
    #[error("server failure (rcode {0})")]
    Server(u8),
    #[error("answer truncated")]
    Truncated,
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(String),
}

/// A query for `name`'s records of `qtype`, with `id`.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// Reads the name at `at`, following compression pointers; returns it
/// (lower case, dotted) and where the name ends in the message.
fn name_at(msg: &[u8], mut at: usize) -> Result<(String, usize), Error> {
    let mut out = String::new();
    let mut end = None;
    // Each jump must go backwards, so a loop of pointers ends.
    let mut limit = at;
    loop {
        let len = *msg
            .get(at)
            .ok_or(Error::Malformed("name runs past the end"))? as usize;
        match len & 0xC0 {
            0xC0 => {
                let lo = *msg.get(at + 1).ok_or(Error::Malformed("cut pointer"))? as usize;
                let target = (len & 0x3F) << 8 | lo;
                if target >= limit {
                    return Err(Error::Malformed("forward compression pointer"));
                }
                end.get_or_insert(at + 2);
                limit = target;
                at = target;
            }
            0 if len == 0 => {
                return Ok((out, end.unwrap_or(at + 1)));
            }
            0 => {
                let label = msg
                    .get(at + 1..at + 1 + len)
                    .ok_or(Error::Malformed("label runs past the end"))?;
                if !out.is_empty() {
                    out.push('.');
                }
                out.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
                if out.len() > 255 {
                    return Err(Error::Malformed("name too long"));
                }
                at += 1 + len;
            }
            _ => return Err(Error::Malformed("reserved label type")),
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, Error> {
    msg.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(Error::Malformed("record runs past the end"))
}

/// The addresses of `name` (type `qtype`) in an answer to query `id`.
pub fn parse(msg: &[u8], id: u16, name: &str, qtype: u16) -> Result<Vec<IpAddr>, Error> {
    if msg.len() < 12 {
        return Err(Error::Malformed("shorter than a header"));
    }
    if u16_at(msg, 0)? != id || msg[2] & 0x80 == 0 {
        return Err(Error::Malformed("not the answer to our query"));
    }
    if msg[2] & 0x02 != 0 {
        return Err(Error::Truncated);
    }
    match msg[3] & 0x0F {
        0 => {}
        3 => return Err(Error::NoSuchName),
        rcode => return Err(Error::Server(rcode)),
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    if qd != 1 {
        return Err(Error::Malformed("not one question"));
    }
    let (qname, at) = name_at(msg, 12)?;
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    if qname != want || u16_at(msg, at)? != qtype {
        return Err(Error::Malformed("answers another question"));
    }
    let mut at = at + 4;
    // The names that stand for `name` (it and the CNAME targets met).
    let mut aliases = vec![want];
    let mut out = Vec::new();
    for _ in 0..an {
        let (owner, next) = name_at(msg, at)?;
        let rtype = u16_at(msg, next)?;
        let rdlen = u16_at(msg, next + 8)? as usize;
        let rdata = msg
            .get(next + 10..next + 10 + rdlen)
            .ok_or(Error::Malformed("record data runs past the end"))?;
        at = next + 10 + rdlen;
        if !aliases.contains(&owner) {
            continue;
        }
        match (rtype, rdata.len()) {
            (TYPE_A, 4) if qtype == TYPE_A => {
                out.push(IpAddr::V4(Ipv4Addr::new(
                    rdata[0], rdata[1], rdata[2], rdata[3],
                )));
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                out.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            (TYPE_CNAME, _) => {
                let (target, _) = name_at(msg, next + 10)?;
                if aliases.len() < 16 {
                    aliases.push(target);
                }
            }
            (TYPE_A | TYPE_AAAA, _) => return Err(Error::Malformed("address of the wrong length")),
            _ => {}
        }
        if out.len() >= ANSWERS_MAX {
            break;
        }
    }
    Ok(out)
}

/// Asks `server` for `name`'s records of `qtype`.
pub fn ask(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    id: u16,
    timeout: Duration,
) -> Result<Vec<IpAddr>, Error> {
    let io = |e: io::Error| Error::Io(format!("{server}: {e}"));
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).map_err(io)?;
    sock.connect(server).map_err(io)?;
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    sock.send(&query(id, name, qtype)).map_err(io)?;
    let mut buf = vec![0u8; ANSWER_BYTES_MAX];
    // Datagrams that are not our answer (a late one to an earlier query)
    // are skipped, within the timeout.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let n = sock.recv(&mut buf).map_err(io)?;
        match parse(&buf[..n], id, name, qtype) {
            Err(Error::Malformed("not the answer to our query"))
                if std::time::Instant::now() < deadline =>
            {
                continue
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u16, name: &str, qtype: u16, records: &[(u16, &[u8])], flags: u8) -> Vec<u8> {
        let mut q = query(id, name, qtype);
        q[2] = 0x81 | flags;
        q[3] = 0x80;
        q[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, data) in records {
            // A pointer to the question's name.
            q.extend_from_slice(&[0xC0, 12]);
            q.extend_from_slice(&rtype.to_be_bytes());
            q.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            q.extend_from_slice(&(data.len() as u16).to_be_bytes());
            q.extend_from_slice(data);
        }
        q
    }

    #[test]
    fn reads_addresses_and_refuses_what_is_not_our_answer() {
        let a = answer(
            7,
            "orders.svc.local",
            TYPE_A,
            &[(TYPE_A, &[10, 0, 0, 1]), (TYPE_A, &[10, 0, 0, 2])],
            0,
        );
        assert_eq!(
            parse(&a, 7, "Orders.svc.local.", TYPE_A).unwrap(),
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        assert!(
            parse(&a, 8, "orders.svc.local", TYPE_A).is_err(),
            "another id"
        );
        assert!(
            parse(&a, 7, "billing.svc.local", TYPE_A).is_err(),
            "another name"
        );
        let tc = answer(7, "x.y", TYPE_A, &[], 0x02);
        assert_eq!(parse(&tc, 7, "x.y", TYPE_A), Err(Error::Truncated));
        let mut nx = answer(7, "x.y", TYPE_A, &[], 0);
        nx[3] |= 3;
        assert_eq!(parse(&nx, 7, "x.y", TYPE_A), Err(Error::NoSuchName));
        let short = answer(7, "x.y", TYPE_A, &[(TYPE_A, &[1, 2, 3])], 0);
        assert!(parse(&short, 7, "x.y", TYPE_A).is_err());
    }

    #[test]
    fn no_input_panics() {
        let good = answer(1, "a.b", TYPE_A, &[(TYPE_A, &[1, 2, 3, 4])], 0);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut], 1, "a.b", TYPE_A);
        }
        let mut looped = good.clone();
        // A pointer to itself.
        let at = looped.len() - 16;
        looped[at] = 0xC0;
        looped[at + 1] = at as u8;
        assert!(parse(&looped, 1, "a.b", TYPE_A).is_err());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut m = good.clone();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % m.len();
            m[i] = (x >> 32) as u8;
            let _ = parse(&m, 1, "a.b", TYPE_A);
        }
    }
}
