//! The DNS messages the job's resolver understands: one question in, A/AAAA answers or
//! NXDOMAIN out (RFC 1035 §4). Written by hand: the resolver needs a question's name and
//! type and an answer's records, a few dozen lines; the DNS crates (hickory) bring a
//! whole resolver and server stack for it.

use std::net::IpAddr;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
/// Answers are cached by the job's libc for at most this long; short, so a name whose
/// rule changes is not served stale for long.
const TTL: u32 = 30;

/// One question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The header's RD bit and opcode, echoed back.
    flags: u16,
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section as received (echoed in the answer).
    question: Vec<u8>,
}

/// Parses a query; Err carries the id (when there is one) for a FORMERR answer.
pub fn parse_query(msg: &[u8]) -> Result<Query, Option<u16>> {
    if msg.len() < 12 {
        return Err(None);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    // A response, or not exactly one question: not something a stub resolver asks.
    if flags & 0x8000 != 0 || qdcount != 1 {
        return Err(Some(id));
    }
    let mut at = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = *msg.get(at).ok_or(Some(id))? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // No compression in a question (nothing precedes it to point at).
        if len > 63 {
            return Err(Some(id));
        }
        let label = msg.get(at..at + len).ok_or(Some(id))?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let fixed = msg.get(at..at + 4).ok_or(Some(id))?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    Ok(Query {
        id,
        flags,
        name: labels.join("."),
        qtype,
        qclass,
        question: msg[12..at + 4].to_vec(),
    })
}

/// An answer to `q`: `rcode`, and one record per address of the question's type.
pub fn answer(q: &Query, rcode: u8, addrs: &[IpAddr]) -> Vec<u8> {
    let records: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| {
            matches!(
                (a, q.qtype),
                (IpAddr::V4(_), TYPE_A) | (IpAddr::V6(_), TYPE_AAAA)
            )
        })
        .collect();
    let mut out = Vec::with_capacity(12 + q.question.len() + records.len() * 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, the query's opcode and RD, RA (we recurse for the job), the rcode.
    let flags = 0x8000 | (q.flags & 0x7900) | 0x0080 | u16::from(rcode & 0x0f);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for a in records {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&TTL.to_be_bytes());
        match a {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    out
}

/// A header-only error answer (FORMERR) for a message that could not be parsed.
pub fn format_error(id: u16) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&(0x8080u16 | u16::from(RCODE_FORMERR)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn round_trip() {
        let q = parse_query(&query("Files.Example.ORG", TYPE_A)).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (0x1234, "files.example.org", TYPE_A)
        );
        let addrs: Vec<IpAddr> = vec![
            "198.51.100.7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let a = answer(&q, RCODE_NOERROR, &addrs);
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, RCODE_NOERROR);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one A record");
        assert_eq!(&a[a.len() - 4..], &[198, 51, 100, 7]);
        let nx = answer(&q, RCODE_NXDOMAIN, &[]);
        assert_eq!(nx[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(a[2] & 0x80, 0x80, "QR set");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(None));
        let mut m = query("a.b", TYPE_A);
        m.truncate(m.len() - 2);
        assert_eq!(parse_query(&m), Err(Some(0x1234)));
        let mut m = query("a.b", TYPE_A);
        m[12] = 200;
        assert!(parse_query(&m).is_err());
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse_query(&junk);
        }
    }
}
