//! Wire format of a mesh connection: the length prefix, the handshake record and frame
//! decoders (pure functions, fuzzed), and the Noise chunking of a frame when encrypted.
//! Nothing here does IO.
use crate::proto::meshpb::{
    mesh_frame_in, MeshChannelMessage, MeshFrameIn, MeshHandshake, MeshMessageKind,
    MeshPeerEntryHeader,
};
use prost::Message;

/// Protocol name both sides must send in their handshake.
pub const PROTOCOL: &str = "meshd-mesh";
/// Lowest protocol version this build speaks (2: the dialing side confirms the Noise
/// handshake with a sealed record before either side registers the connection).
pub const MIN_VERSION: u32 = 2;
/// Highest protocol version this build speaks.
pub const MAX_VERSION: u32 = 2;
/// Noise pattern of encrypted connections: no static keys, both sides prove knowledge
/// of the PSK (the mesh key) in the first two messages.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Plaintext of the record the dialing side seals right after the Noise handshake. The
/// accepting side registers nothing before it has opened it: NNpsk0's first message
/// can be replayed by anyone who captured it, but only the holder of that exchange's
/// ephemeral key can seal this.
pub const CONFIRM: &[u8] = b"meshd-mesh confirm";
/// Largest handshake record accepted (before anything is authenticated).
pub const MAX_HANDSHAKE: usize = 4096;
/// Longest channel name.
pub const MAX_CHANNEL_NAME: usize = 256;
/// Room for a frame's own fields around a payload of `max_frame` bytes.
pub const FRAME_OVERHEAD: usize = 1024;
/// Largest Noise transport message (Noise spec limit) and its AEAD tag.
pub const NOISE_MAX_MSG: usize = 65535;
pub const NOISE_TAG: usize = 16;
const NOISE_MAX_PLAIN: usize = NOISE_MAX_MSG - NOISE_TAG;

/// Why a record from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The bytes are not a valid protobuf record of the expected type.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The record decoded but breaks a rule of the protocol.
    #[error("invalid record: {0}")]
    Invalid(String),
    /// Noise decryption failed: wrong key or altered bytes.
    #[error("decryption failed")]
    Decrypt,
}

/// Decodes and checks a handshake record (the bytes after its length prefix).
pub fn decode_handshake(buf: &[u8]) -> Result<MeshHandshake, WireError> {
    if buf.len() > MAX_HANDSHAKE {
        return Err(WireError::TooLarge {
            len: buf.len(),
            max: MAX_HANDSHAKE,
        });
    }
    let hs = MeshHandshake::decode(buf).map_err(|e| WireError::Undecodable(e.to_string()))?;
    if hs.protocol != PROTOCOL {
        return Err(WireError::Invalid(format!(
            "unknown protocol {:?}",
            hs.protocol
        )));
    }
    if hs.min_version > hs.max_version {
        return Err(WireError::Invalid("min_version above max_version".into()));
    }
    if hs.max_version < MIN_VERSION || hs.min_version > MAX_VERSION {
        return Err(WireError::Invalid(format!(
            "no common protocol version (remote {}..={}, local {MIN_VERSION}..={MAX_VERSION})",
            hs.min_version, hs.max_version
        )));
    }
    if hs.nickname.len() > 255 || hs.address.len() > 255 {
        return Err(WireError::Invalid("nickname or address too long".into()));
    }
    Ok(hs)
}

/// Decodes and checks a frame (the plaintext bytes after its length prefix). Topology
/// entries stay encoded, but each one's header must decode.
pub fn decode_frame(buf: &[u8]) -> Result<MeshFrameIn, WireError> {
    decode_frame_bytes(bytes::Bytes::copy_from_slice(buf))
}

/// [`decode_frame`] without a copy: topology entries become slices of `buf`.
pub fn decode_frame_bytes(buf: bytes::Bytes) -> Result<MeshFrameIn, WireError> {
    let frame = MeshFrameIn::decode(buf).map_err(|e| WireError::Undecodable(e.to_string()))?;
    match &frame.body {
        None => return Err(WireError::Invalid("frame without a body".into())),
        Some(mesh_frame_in::Body::Channel(m)) => check_channel_message(m)?,
        Some(mesh_frame_in::Body::Digest(d)) if d.summary_only && !d.items.is_empty() => {
            return Err(WireError::Invalid("summary-only digest with items".into()))
        }
        Some(mesh_frame_in::Body::Topology(t)) => {
            for p in &t.peers {
                decode_entry_header(p)?;
            }
        }
        Some(_) => {}
    }
    Ok(frame)
}

/// A topology frame (`MeshFrame.topology`, field 2, holding `MeshTopology.peers`,
/// field 1, once per entry) assembled from encoded `MeshPeerEntry`s without decoding
/// them; `None` for no entries.
pub fn topology_frame<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Option<bytes::Bytes> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut body = Vec::new();
    for e in entries {
        encode_key(1, WireType::LengthDelimited, &mut body);
        encode_varint(e.len() as u64, &mut body);
        body.extend_from_slice(e);
    }
    if body.is_empty() {
        return None;
    }
    let mut frame = Vec::with_capacity(body.len() + 8);
    encode_key(2, WireType::LengthDelimited, &mut frame);
    encode_varint(body.len() as u64, &mut frame);
    frame.extend_from_slice(&body);
    Some(frame.into())
}

/// The name, uid and version of an encoded topology entry.
pub fn decode_entry_header(entry: &[u8]) -> Result<MeshPeerEntryHeader, WireError> {
    MeshPeerEntryHeader::decode(entry)
        .map_err(|e| WireError::Undecodable(format!("topology entry: {e}")))
}

fn check_channel_message(m: &MeshChannelMessage) -> Result<(), WireError> {
    if m.channel.is_empty() || m.channel.len() > MAX_CHANNEL_NAME {
        return Err(WireError::Invalid("channel name empty or too long".into()));
    }
    if MeshMessageKind::try_from(m.kind).is_err() {
        return Err(WireError::Invalid(format!(
            "unknown message kind {}",
            m.kind
        )));
    }
    Ok(())
}

/// Prepends the 4-byte big-endian length.
pub fn with_length_prefix(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    push_length_prefixed(&mut out, payload);
    out
}

/// Appends `payload` to `out` after its 4-byte big-endian length.
pub fn push_length_prefixed(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads a length prefix and checks it against `max`.
pub fn parse_length(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(len)
}

/// Size on the wire of `plain` bytes once sealed in Noise messages.
pub fn sealed_len(plain: usize) -> usize {
    let chunks = plain.div_ceil(NOISE_MAX_PLAIN).max(1);
    plain + chunks * NOISE_TAG
}

/// Encrypts a frame as consecutive Noise messages of at most 65535 bytes each; the
/// receiver splits the sealed record at the same boundaries. `nonce` advances by one per
/// chunk.
pub fn seal(
    cipher: &snow::StatelessTransportState,
    nonce: &mut u64,
    plain: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; sealed_len(plain.len())];
    let mut written = 0;
    let mut chunks: Vec<&[u8]> = plain.chunks(NOISE_MAX_PLAIN).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let n = cipher
            .write_message(*nonce, chunk, &mut out[written..])
            .map_err(|_| WireError::Decrypt)?;
        *nonce += 1;
        written += n;
    }
    out.truncate(written);
    Ok(out)
}

/// Reverses [`seal`].
pub fn open(
    cipher: &snow::StatelessTransportState,
    nonce: &mut u64,
    sealed: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; sealed.len()];
    let mut written = 0;
    for chunk in sealed.chunks(NOISE_MAX_MSG) {
        let n = cipher
            .read_message(*nonce, chunk, &mut out[written..])
            .map_err(|_| WireError::Decrypt)?;
        *nonce += 1;
        written += n;
    }
    out.truncate(written);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::meshpb::{mesh_frame, MeshFrame, MeshHeartbeat};
    use rand::{Rng, SeedableRng};

    fn sample_handshake() -> Vec<u8> {
        MeshHandshake {
            protocol: PROTOCOL.into(),
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            name: 7,
            nickname: "n1".into(),
            uid: 9,
            address: "127.0.0.1:1".into(),
            encrypted: false,
        }
        .encode_to_vec()
    }

    fn sample_frames() -> Vec<Vec<u8>> {
        vec![
            MeshFrame {
                body: Some(mesh_frame::Body::Heartbeat(MeshHeartbeat {})),
            }
            .encode_to_vec(),
            MeshFrame {
                body: Some(mesh_frame::Body::Channel(MeshChannelMessage {
                    channel: "c".into(),
                    kind: 1,
                    src: 1,
                    dst: 2,
                    ttl: 3,
                    payload: vec![1, 2, 3],
                })),
            }
            .encode_to_vec(),
        ]
    }

    #[test]
    fn valid_records_decode() {
        assert_eq!(decode_handshake(&sample_handshake()).unwrap().name, 7);
        for f in sample_frames() {
            decode_frame(&f).unwrap();
        }
    }

    #[test]
    fn wrong_protocol_and_versions_are_refused() {
        let mut hs = decode_handshake(&sample_handshake()).unwrap();
        hs.protocol = "weave".into();
        assert!(matches!(
            decode_handshake(&hs.encode_to_vec()),
            Err(WireError::Invalid(_))
        ));
        hs.protocol = PROTOCOL.into();
        hs.min_version = 5;
        hs.max_version = 6;
        assert!(matches!(
            decode_handshake(&hs.encode_to_vec()),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(decode_frame(&[]), Err(WireError::Invalid(_))));
    }

    #[test]
    fn assembled_topology_frame_is_the_protobuf_encoding() {
        use crate::proto::meshpb::{
            mesh_frame, MeshFrame, MeshPeerConnection, MeshPeerEntry, MeshTopology,
        };
        let peers: Vec<MeshPeerEntry> = (1..=3u64)
            .map(|n| MeshPeerEntry {
                name: n,
                nickname: format!("n{n}"),
                uid: n * 7,
                version: n + 100,
                address: format!("10.0.0.{n}:6783"),
                connections: vec![MeshPeerConnection {
                    peer: n + 1,
                    address: String::new(),
                    outbound: true,
                }],
                meta: vec![n as u8; 300],
            })
            .collect();
        let encoded: Vec<Vec<u8>> = peers.iter().map(|p| p.encode_to_vec()).collect();
        let assembled = topology_frame(encoded.iter().map(|e| e.as_slice())).unwrap();
        let expected = MeshFrame {
            body: Some(mesh_frame::Body::Topology(MeshTopology {
                peers: peers.clone(),
            })),
        }
        .encode_to_vec();
        assert_eq!(assembled.as_ref(), expected.as_slice());
        // Read back: every entry arrives as its own bytes, with a decodable header.
        let Some(mesh_frame_in::Body::Topology(t)) = decode_frame(&assembled).unwrap().body else {
            panic!("not a topology frame");
        };
        assert_eq!(t.peers.len(), 3);
        for (raw, want) in t.peers.iter().zip(&encoded) {
            assert_eq!(raw.as_ref(), want.as_slice());
            let h = decode_entry_header(raw).unwrap();
            assert!(h.version > 100 && h.uid == h.name * 7);
        }
        assert!(topology_frame(std::iter::empty()).is_none());
    }

    #[test]
    fn length_prefix_limit() {
        assert_eq!(parse_length(10u32.to_be_bytes(), 10), Ok(10));
        assert_eq!(
            parse_length(11u32.to_be_bytes(), 10),
            Err(WireError::TooLarge { len: 11, max: 10 })
        );
    }

    /// Random and mutated inputs never panic the decoders (the stable stand-in for the
    /// cargo-fuzz targets in `fuzz/`).
    #[test]
    fn decoders_never_panic_on_random_or_mutated_bytes() {
        let seed: u64 = rand::rng().random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut corpus = sample_frames();
        corpus.push(sample_handshake());
        for i in 0..5000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..200);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut b = corpus[i % corpus.len()].clone();
                for _ in 0..rng.random_range(1..4) {
                    match rng.random_range(0..3) {
                        0 if !b.is_empty() => {
                            let at = rng.random_range(0..b.len());
                            b[at] = rng.random();
                        }
                        1 => b.insert(rng.random_range(0..=b.len()), rng.random()),
                        _ if !b.is_empty() => {
                            b.truncate(rng.random_range(0..b.len()));
                        }
                        _ => {}
                    }
                }
                b
            };
            let _ = decode_frame(&buf);
            let _ = decode_handshake(&buf);
        }
    }

    #[test]
    fn seal_open_round_trip_across_chunks() {
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
        let psk = [7u8; 32];
        let mut i = snow::Builder::new(params.clone())
            .psk(0, &psk)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(params)
            .psk(0, &psk)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let mut tmp = vec![0u8; 1024];
        let n = i.write_message(&[], &mut buf).unwrap();
        r.read_message(&buf[..n], &mut tmp).unwrap();
        let n = r.write_message(&[], &mut buf).unwrap();
        i.read_message(&buf[..n], &mut tmp).unwrap();
        let i = i.into_stateless_transport_mode().unwrap();
        let r = r.into_stateless_transport_mode().unwrap();
        let plain: Vec<u8> = (0..200_000u32).map(|x| x as u8).collect();
        let (mut n1, mut n2) = (0, 0);
        let sealed = seal(&i, &mut n1, &plain).unwrap();
        assert_eq!(sealed.len(), sealed_len(plain.len()));
        assert_eq!(open(&r, &mut n2, &sealed).unwrap(), plain);
        assert_eq!(n1, n2);
        let mut bad = sealed.clone();
        bad[5] ^= 1;
        let mut n3 = 0;
        assert_eq!(open(&r, &mut n3, &bad), Err(WireError::Decrypt));
    }
}
