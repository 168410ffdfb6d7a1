//! Plain-text tables in etcdctl's style (`+---+` borders, centred upper-case header,
//! right-aligned cells) and Go humanize-style byte sizes (`20 kB`).

/// Renders `headers` and `rows` as a bordered table ending in a newline.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let border: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = border.clone();
    for (h, w) in headers.iter().zip(&widths) {
        let pad = w - h.chars().count();
        let left = pad / 2;
        out += &format!("| {}{}{} ", " ".repeat(left), h, " ".repeat(pad - left));
    }
    out += "|\n";
    out += &border;
    for row in rows {
        for (cell, w) in row.iter().zip(&widths) {
            out += &format!("| {cell:>w$} ");
        }
        out += "|\n";
    }
    out += &border;
    out
}

/// Bytes in SI units like Go's `humanize.Bytes`: `512 B`, `20 kB`, `1.5 MB`.
pub fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let n = n.max(0) as f64;
    if n < 10.0 {
        return format!("{n} B");
    }
    let e = (n.ln() / 1000f64.ln()).floor() as usize;
    let e = e.min(UNITS.len() - 1);
    let val = (n / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if val < 10.0 {
        format!("{val:.1} {}", UNITS[e])
    } else {
        format!("{val:.0} {}", UNITS[e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_matches_go_humanize() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(9), "9 B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(20480), "20 kB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(25_000_000), "25 MB");
    }

    #[test]
    fn table_layout_matches_etcdctl() {
        let t = render(
            &["ID", "STATUS"],
            &[vec!["2e1259d415f2a040".into(), "started".into()]],
        );
        assert_eq!(
            t,
            "+------------------+---------+\n\
             |        ID        | STATUS  |\n\
             +------------------+---------+\n\
             | 2e1259d415f2a040 | started |\n\
             +------------------+---------+\n"
        );
    }
}
