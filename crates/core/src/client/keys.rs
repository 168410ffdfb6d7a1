//! Range-end helpers with etcd's conventions: a prefix is `[key, key+1)`, "from key"
//! is `[key, "\0")`, and an empty prefix means every key.

/// The range end that makes `[key, end)` cover every key starting with `key`
/// (etcd's `GetPrefixRangeEnd`): increment the last byte below 0xff, dropping the
/// 0xff bytes after it; all-0xff (or empty) means "to the end", `\0`.
pub fn prefix_range_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The range end meaning "every key >= key".
pub fn from_key_range_end() -> Vec<u8> {
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_prefix_range_end() {
        assert_eq!(prefix_range_end(b"foo"), b"fop");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
    }
}
