//! RESP wire handling: finding frame boundaries without building values ([`scanner`]), reading
//! the few command names and arguments the proxy must understand ([`command`]) and the little it
//! reads inside replies ([`reply`]), and the server's command table ([`command_table`]), by
//! which it answers unauthenticated clients as Redis would.

pub mod command;
pub mod command_table;
pub mod reply;
pub mod scanner;

/// Parses a header line `<type byte><signed decimal>\r\n` starting at `pos`; returns the number
/// and the offset after the CRLF. None when the line is incomplete or not a number. Runs once or
/// twice per command, so the digits are read by hand rather than through `str::parse`.
pub(crate) fn header_number(buf: &[u8], pos: usize) -> Option<(i64, usize)> {
    let mut i = pos + 1;
    let negative = buf.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let digits_start = i;
    let mut n: i64 = 0;
    while let Some(&b) = buf.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
        i += 1;
    }
    if i == digits_start || buf.get(i) != Some(&b'\r') || buf.get(i + 1) != Some(&b'\n') {
        return None;
    }
    Some((if negative { -n } else { n }, i + 2))
}

#[cfg(test)]
mod tests {
    use super::header_number;

    #[test]
    fn header_numbers() {
        assert_eq!(header_number(b"*3\r\n", 0), Some((3, 4)));
        assert_eq!(header_number(b"xx$-1\r\n", 2), Some((-1, 7)));
        assert_eq!(header_number(b"*12", 0), None);
        assert_eq!(header_number(b"*\r\n", 0), None);
        assert_eq!(header_number(b"*1x\r\n", 0), None);
        assert_eq!(header_number(b"*99999999999999999999\r\n", 0), None);
    }
}
