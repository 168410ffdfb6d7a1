//! Any bytes given to the handshake decoder yield a handshake or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_core::mesh::decode_handshake(data);
});
