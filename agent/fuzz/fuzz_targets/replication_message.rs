//! The walsender's messages (inside CopyData) must never panic the parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decant_agent::replication::messages::parse_server_message(data);
});
