//! Any bytes given to the handshake decoder yield a handshake or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::untrusted::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = Decoder::MeshHandshake.run(data);
});
