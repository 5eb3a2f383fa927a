//! Reading a `decant` slot through the SQL interface and decoding it.

use decant_proto::{decode, Record};

/// Session settings under which `Text` values are produced; the tests'
/// source queries run under the same ones, so text forms compare exactly.
pub const TEXT_SETTINGS: &str =
    "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = UTC; SET extra_float_digits = 3; SET bytea_output = hex";

/// A source database with the extension and a `decant` slot named `slot`.
/// The extension's DDL capture is disabled: these tests read the plugin's
/// records for the statements they run, and the capture would add a
/// `decant.ddl` message for each DDL statement (`agent/tests/ddl.rs` tests
/// the capture).
pub fn prepare_source(client: &mut postgres::Client, slot: &str) {
    client.batch_execute(TEXT_SETTINGS).expect("settings");
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS decant;
             ALTER EVENT TRIGGER decant_ddl_end DISABLE; ALTER EVENT TRIGGER decant_ddl_drop DISABLE;
             ALTER EVENT TRIGGER decant_ddl_start DISABLE;",
        )
        .expect("CREATE EXTENSION decant");
    client.query("SELECT pg_create_logical_replication_slot($1, 'decant')", &[&slot]).expect("create slot");
}

/// Consumes everything pending in `slot`: one message per row, each exactly
/// one record. Options are (name, value) pairs for the plugin.
pub fn get_changes(client: &mut postgres::Client, slot: &str, options: &[(&str, &str)]) -> Result<Vec<Vec<u8>>, postgres::Error> {
    let flat: Vec<String> = options.iter().flat_map(|(n, v)| [n.to_string(), v.to_string()]).collect();
    let rows = client.query("SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, VARIADIC $2::text[])", &[&slot, &flat])?;
    Ok(rows.into_iter().map(|r| r.get::<_, Vec<u8>>(0)).collect())
}

/// Decodes messages, asserting that each is one whole record with a good CRC.
pub fn decode_all(messages: &[Vec<u8>]) -> Vec<Record<'_>> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (record, used) = decode(m).unwrap_or_else(|e| panic!("message {i}: {e}"));
            assert_eq!(used, m.len(), "message {i} has bytes after its record");
            record
        })
        .collect()
}

/// Decodes messages that may each hold several records (`max_message_bytes`).
pub fn decode_packed(messages: &[Vec<u8>]) -> Vec<Record<'_>> {
    let mut records = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut at = 0;
        while at < m.len() {
            let (record, used) = decode(&m[at..]).unwrap_or_else(|e| panic!("message {i}, byte {at}: {e}"));
            records.push(record);
            at += used;
        }
    }
    records
}
