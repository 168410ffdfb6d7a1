//! Any bytes given as a JSON gateway request body yield a value or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_core::untrusted::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = Decoder::GatewayJson.run(data);
});
