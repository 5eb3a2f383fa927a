//! Which value stopped a copy: a source whose encoding is not UTF-8 can hold
//! a character that UTF-8 has no equivalent for (a WIN1252 byte 0x81, bytes
//! of no encoding in a SQL_ASCII database). The server's error names only
//! the bytes; the operator needs the column and the row to correct it.

use tokio_postgres::Client;

use crate::connect::sql::{quote_ident, quote_literal};

/// Whether a source error's SQLSTATE is a character that has no
/// equivalent in the client's encoding (UTF-8).
pub fn is_unconvertible(code: Option<&str>) -> bool {
    matches!(code, Some("22P05" | "22021"))
}

/// Finds the first column of `schema.table` holding a value that does not
/// convert to UTF-8, and the key (primary key or replica identity columns,
/// else the ctid) of a row holding it: `column "c" in the row with (id)=(3)`.
/// `None` when none is found (the row changed since) or the search fails.
pub async fn locate(client: &Client, schema: &str, table: &str, columns: &[String]) -> Option<String> {
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    // One scan per column; the first that fails to convert is the one.
    let mut bad = None;
    for c in columns {
        let probe = format!("SELECT count(convert_to({}::text, 'UTF8')) FROM ONLY {qualified}", quote_ident(c));
        match client.query_one(&probe, &[]).await {
            Ok(_) => continue,
            Err(e) if is_unconvertible(e.code().map(|c| c.code())) => {
                bad = Some(c);
                break;
            }
            Err(_) => return None,
        }
    }
    let column = bad?;
    let key: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
              WHERE i.indexrelid = (SELECT indexrelid FROM pg_index WHERE indrelid = $1::text::regclass AND (indisprimary OR indisreplident)
                                     ORDER BY indisprimary DESC LIMIT 1)
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&qualified],
        )
        .await
        .ok()?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let key_cols: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
    let key_expr = if key_cols.is_empty() { "ctid".to_owned() } else { key_cols.join(", ") };
    let key_names = if key.is_empty() { "ctid".to_owned() } else { key.join(", ") };
    // Only rows with a character outside ASCII can fail; each is tried in
    // a block of its own, and the first failure reports its key.
    let block = format!(
        "DO $decant$ DECLARE r record; BEGIN
           FOR r IN SELECT ({key_expr})::text AS k, {col}::text AS v FROM ONLY {qualified} WHERE {col}::text ~ '[^[:ascii:]]' LOOP
             BEGIN
               PERFORM convert_to(r.v, 'UTF8');
             EXCEPTION WHEN untranslatable_character OR character_not_in_repertoire THEN
               RAISE EXCEPTION USING MESSAGE = {marker} || r.k;
             END;
           END LOOP;
         END $decant$",
        col = quote_ident(column),
        marker = quote_literal(MARKER),
    );
    let found = match client.batch_execute(&block).await {
        Err(e) => e.as_db_error().and_then(|d| d.message().strip_prefix(MARKER).map(str::to_owned)),
        Ok(()) => None,
    };
    Some(match found {
        Some(k) => format!("column {column:?} in the row with ({key_names}) = {k}"),
        None => format!("column {column:?}"),
    })
}

const MARKER: &str = "decant: row ";
