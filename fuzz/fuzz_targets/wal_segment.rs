//! Any bytes read as a Raft write-ahead log segment are replayed or refused, never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::untrusted::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = Decoder::WalSegment.run(data);
});
