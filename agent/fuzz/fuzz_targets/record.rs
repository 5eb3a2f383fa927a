//! Record frames from the source or the wire must never panic the decoder,
//! and whatever decodes must re-encode to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((record, used)) = decant_proto::decode(data) {
        let mut again = Vec::new();
        decant_proto::encode(&record, &mut again);
        assert_eq!(&again[..], &data[..used]);
    }
});
