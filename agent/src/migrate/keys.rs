//! Key ranges: how the full copy splits a large table on a source older
//! than PostgreSQL 14, which has no TID range scan (reading a ctid range
//! there scans the whole table). The table is cut at values of its primary
//! key (else of a unique btree index on NOT NULL columns), picked from a
//! sample of its pages taken in the task's snapshot and sorted by the
//! source itself, so in its own collations and operators. A range is
//! `key >= from AND key < to` (a row comparison for a key of several
//! columns), and the text of one bound both closes a range and opens the
//! next: every row falls in exactly one range whatever the values are.
//! The bounds are stored with the plan in the destination, so a resumed
//! copy runs the same ranges.

use decant_proto::grpc::PageRange;
use tokio_postgres::Client;

use crate::connect::sql::quote_ident;
use crate::throttle::SharedPace;

/// The sample reads about this many pages per range, and at least
/// `MIN_SAMPLE_PAGES` (whole small tables).
const SAMPLE_PAGES_PER_RANGE: u64 = 64;
const MIN_SAMPLE_PAGES: u64 = 512;

/// The columns of the table's key that ranges can follow: the primary key,
/// else the unique btree index (immediate, valid, without predicate or
/// expression) on NOT NULL columns with the fewest columns. `None` when it
/// has none.
pub async fn key_columns(
    client: &Client,
    table: u32,
    server_version: u32,
    pace: &SharedPace,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    // INCLUDE columns (PostgreSQL 11+) are not part of the order.
    let key_atts = if server_version >= 110000 { "i.indnkeyatts" } else { "i.indnatts" };
    let sql = format!(
        "SELECT array_agg(a.attname::text ORDER BY k.n)
           FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_am m ON m.oid = ic.relam AND m.amname = 'btree'
           CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indisvalid
            AND i.indpred IS NULL AND i.indexprs IS NULL AND k.n <= {key_atts}
          GROUP BY i.indexrelid, i.indisprimary
         HAVING bool_and(a.attnotnull)
          ORDER BY i.indisprimary DESC, count(*), i.indexrelid
          LIMIT 1"
    );
    pace.query().await;
    Ok(client.query_opt(&sql, &[&table]).await?.map(|r| r.get(0)))
}

/// Below this correlation between the key's order and the heap pages'
/// order (measured in the sample), a table is copied whole: each range
/// would be a bitmap heap scan touching most of the table's pages, and
/// several of them read the table several times. Measured on PostgreSQL
/// 12 (pgbench_accounts, 1.3 GB, schema + full, 2 workers, 2 cores): a
/// shuffled key split in 13 ranges 23.5–38.3 s, whole 15.4–18.6 s; the
/// key in heap order split 14.6–16.2 s, whole 15.5–18.1 s.
pub const MIN_CORRELATION: f64 = 0.8;

/// How a table is split by its key.
#[derive(Debug)]
pub enum KeySplit {
    Ranges(Vec<PageRange>),
    /// The key's order is not the heap's (the sample's correlation).
    Uncorrelated(f64),
}

/// About `pieces` key ranges covering the table `schema.name` of `pages`
/// heap pages, cut at values of `key` seen in a sample of its pages (fewer
/// when the sample holds fewer distinct values; none when it is empty),
/// unless the key's order is not the order of the table's pages.
#[allow(clippy::too_many_arguments)]
pub async fn key_ranges(
    client: &Client,
    schema: &str,
    name: &str,
    key: &[String],
    pages: u64,
    pieces: u64,
    pace: &SharedPace,
) -> Result<KeySplit, tokio_postgres::Error> {
    let sample_pages = pieces.saturating_mul(SAMPLE_PAGES_PER_RANGE).max(MIN_SAMPLE_PAGES);
    let percent = if pages <= sample_pages { 100.0 } else { 100.0 * sample_pages as f64 / pages as f64 };
    // The text forms are named apart from the columns, and the order is
    // by the qualified columns: an ORDER BY name matching an output column
    // would sort by the text.
    let texts: Vec<String> = key.iter().enumerate().map(|(i, c)| format!("t.{}::text AS k{i}", quote_ident(c))).collect();
    let order: Vec<String> = key.iter().map(|c| format!("t.{}", quote_ident(c))).collect();
    // REPEATABLE: the same pages for the same table contents.
    let sql = format!(
        "SELECT {}, (t.ctid::text::point)[0]::int8 AS page FROM ONLY {}.{} AS t TABLESAMPLE SYSTEM ({percent}) REPEATABLE (0) ORDER BY {}",
        texts.join(", "),
        quote_ident(schema),
        quote_ident(name),
        order.join(", ")
    );
    pace.query().await;
    let rows = client.query(&sql, &[]).await?;
    let sample: Vec<Vec<String>> = rows.iter().map(|r| (0..key.len()).map(|i| r.get::<_, String>(i)).collect()).collect();
    let heap_order: Vec<i64> = rows.iter().map(|r| r.get(key.len())).collect();
    let correlation = correlation(&heap_order);
    if correlation.abs() < MIN_CORRELATION {
        return Ok(KeySplit::Uncorrelated(correlation));
    }
    Ok(KeySplit::Ranges(ranges_from_sample(&sample, pieces)))
}

/// The correlation between the rows' positions in key order and their
/// heap pages (`pages`, in key order): 1 when the key follows the pages,
/// about 0 when it is shuffled. 1 for fewer than two rows or one page.
pub fn correlation(pages: &[i64]) -> f64 {
    let n = pages.len() as f64;
    if pages.len() < 2 {
        return 1.0;
    }
    let mean_rank = (n - 1.0) / 2.0;
    let mean_page = pages.iter().map(|&p| p as f64).sum::<f64>() / n;
    let (mut cov, mut var_rank, mut var_page) = (0.0, 0.0, 0.0);
    for (i, &p) in pages.iter().enumerate() {
        let (dr, dp) = (i as f64 - mean_rank, p as f64 - mean_page);
        cov += dr * dp;
        var_rank += dr * dr;
        var_page += dp * dp;
    }
    if var_page == 0.0 {
        return 1.0;
    }
    cov / (var_rank * var_page).sqrt()
}

/// Cuts a sample sorted by the key into `pieces` ranges of about as many
/// sampled rows each: the bounds are the rows at each cut, a repeated
/// bound dropped. The first range is open below, the last open above
/// (values below or above every sampled one, and rows added later).
pub fn ranges_from_sample(sample: &[Vec<String>], pieces: u64) -> Vec<PageRange> {
    let len = sample.len() as u64;
    let mut bounds: Vec<&Vec<String>> = Vec::new();
    for i in 1..pieces {
        let at = (i * len / pieces) as usize;
        // A cut at the first sampled value leaves a range below it that
        // the sample says is empty.
        if at >= sample.len() || sample[at] == sample[0] || bounds.last() == Some(&&sample[at]) {
            continue;
        }
        bounds.push(&sample[at]);
    }
    if bounds.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut from: Vec<String> = Vec::new();
    for b in bounds {
        out.push(PageRange { key_from: from, key_to: b.clone(), ..Default::default() });
        from = b.clone();
    }
    out.push(PageRange { key_from: from, ..Default::default() });
    out
}

/// The WHERE condition that selects the key values [from, to) (an empty
/// bound is open), from the column names and values alone, quoted: `None`
/// for the whole table. The values are untyped literals, so each takes its
/// column's type and is compared in its collation.
pub fn key_condition(columns: &[String], from: &[String], to: &[String]) -> Option<String> {
    let side = |values: &[String], op: &str| -> Option<String> {
        if values.is_empty() {
            return None;
        }
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let vals: Vec<String> = values.iter().map(|v| literal(v)).collect();
        Some(if columns.len() == 1 {
            format!("{} {op} {}", cols[0], vals[0])
        } else {
            format!("({}) {op} ({})", cols.join(", "), vals.join(", "))
        })
    };
    let bounds: Vec<String> = side(from, ">=").into_iter().chain(side(to, "<")).collect();
    (!bounds.is_empty()).then(|| bounds.join(" AND "))
}

/// A string constant holding `value` whatever standard_conforming_strings
/// is: an escape string when it has a backslash.
fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Whether a table's key ranges, in range_id order, cover its key values
/// once: each carries one value per key column, the first is open below,
/// each begins where the one before ends, the last is open above.
pub fn key_ranges_cover(columns: usize, ranges: &[(u32, &[String], &[String])]) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.0);
    let mut from: &[String] = &[];
    for (i, (_, f, t)) in sorted.iter().enumerate() {
        let last = i + 1 == sorted.len();
        let shape = |v: &[String]| v.is_empty() || v.len() == columns;
        if *f != from || !shape(f) || !shape(t) || t.is_empty() != last {
            return false;
        }
        from = t;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| (*s).to_owned()).collect()
    }

    fn keys(ranges: &[PageRange]) -> Vec<(Vec<String>, Vec<String>)> {
        ranges.iter().map(|r| (r.key_from.clone(), r.key_to.clone())).collect()
    }

    #[test]
    fn a_sorted_sample_is_cut_into_ranges_that_chain() {
        let sample: Vec<Vec<String>> = (1..=10).map(|i| v(&[&i.to_string()])).collect();
        let r = ranges_from_sample(&sample, 3);
        assert_eq!(keys(&r), vec![(v(&[]), v(&["4"])), (v(&["4"]), v(&["7"])), (v(&["7"]), v(&[]))]);
        assert!(r.iter().all(|r| r.first_page.is_none() && r.end_page.is_none()));
        // One piece, an empty sample, or a single value: no ranges.
        assert!(ranges_from_sample(&sample, 1).is_empty());
        assert!(ranges_from_sample(&[], 4).is_empty());
        assert!(ranges_from_sample(&vec![v(&["x"]); 50], 4).is_empty());
        // Repeated values give fewer, still chained, ranges.
        let skewed: Vec<Vec<String>> = ["a", "a", "a", "a", "a", "a", "b", "c"].iter().map(|s| v(&[s])).collect();
        assert_eq!(keys(&ranges_from_sample(&skewed, 4)), vec![(v(&[]), v(&["b"])), (v(&["b"]), v(&[]))]);
        // More pieces than sampled rows.
        assert_eq!(keys(&ranges_from_sample(&[v(&["1"]), v(&["2"])], 8)), vec![(v(&[]), v(&["2"])), (v(&["2"]), v(&[]))]);
        // Several columns.
        let pairs: Vec<Vec<String>> = (0..6).map(|i| v(&[&(i / 3).to_string(), &(i % 3).to_string()])).collect();
        assert_eq!(keys(&ranges_from_sample(&pairs, 2)), vec![(v(&[]), v(&["1", "0"])), (v(&["1", "0"]), v(&[]))]);
    }

    #[test]
    fn correlation_tells_a_key_in_heap_order_from_a_shuffled_one() {
        let ordered: Vec<i64> = (0..1000).map(|i| i / 60).collect();
        assert!(correlation(&ordered) > 0.99);
        let reversed: Vec<i64> = ordered.iter().rev().copied().collect();
        assert!(correlation(&reversed) < -0.99);
        // A fixed permutation of the pages: no order.
        let shuffled: Vec<i64> = (0..1000).map(|i| (i * 7919) % 1000 / 60).collect();
        assert!(correlation(&shuffled).abs() < MIN_CORRELATION, "{}", correlation(&shuffled));
        assert_eq!(correlation(&[3]), 1.0);
        assert_eq!(correlation(&[3, 3, 3]), 1.0);
    }

    #[test]
    fn conditions_quote_names_and_values() {
        let one = v(&["id"]);
        assert_eq!(key_condition(&one, &[], &[]), None);
        assert_eq!(key_condition(&one, &v(&["5"]), &[]).as_deref(), Some("\"id\" >= '5'"));
        assert_eq!(key_condition(&one, &v(&["5"]), &v(&["9"])).as_deref(), Some("\"id\" >= '5' AND \"id\" < '9'"));
        let two = v(&["Tenant", "name"]);
        assert_eq!(
            key_condition(&two, &[], &v(&["1", "it's \\ here"])).as_deref(),
            Some("(\"Tenant\", \"name\") < ('1', E'it''s \\\\ here')")
        );
    }

    #[test]
    fn key_ranges_must_chain_from_open_to_open() {
        let (a, b, none) = (v(&["a"]), v(&["b"]), v(&[]));
        assert!(key_ranges_cover(1, &[(1, &a, &b), (0, &none, &a), (2, &b, &none)]));
        assert!(key_ranges_cover(1, &[(0, &none, &none)]));
        assert!(!key_ranges_cover(1, &[(0, &none, &a), (1, &b, &none)]));
        assert!(!key_ranges_cover(1, &[(0, &none, &a)]));
        assert!(!key_ranges_cover(1, &[(0, &none, &a), (1, &a, &b)]));
        assert!(!key_ranges_cover(2, &[(0, &none, &a), (1, &a, &none)]));
        assert!(!key_ranges_cover(1, &[(0, &a, &none)]));
    }
}
