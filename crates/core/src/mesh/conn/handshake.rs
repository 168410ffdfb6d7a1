//! The handshake of a mesh connection: version and identity records, then the Noise
//! NNpsk0 exchange and its sealed confirmation when the mesh has a key.

use super::*;

/// The Noise transport state of an encrypted connection, with the nonce each direction
/// continues from after the handshake's confirmation record.
pub(in crate::mesh) struct Sealed {
    pub(in crate::mesh) cipher: snow::StatelessTransportState,
    pub(in crate::mesh) send_nonce: u64,
    pub(in crate::mesh) recv_nonce: u64,
}

pub(in crate::mesh) async fn handshake(
    inner: &Inner,
    stream: &mut TcpStream,
    outbound: bool,
) -> Result<(MeshHandshake, Option<Sealed>), HandshakeError> {
    let ours = MeshHandshake {
        protocol: wire::PROTOCOL.into(),
        min_version: wire::MIN_VERSION,
        max_version: wire::MAX_VERSION,
        name: inner.cfg.name,
        nickname: inner.cfg.nickname.clone(),
        uid: inner.uid,
        address: inner.cfg.advertise.clone(),
        encrypted: inner.psk.is_some(),
    }
    .encode_to_vec();
    write_record(inner, stream, &ours).await?;
    let theirs = read_record(inner, stream, wire::MAX_HANDSHAKE).await?;
    let hello = wire::decode_handshake(&theirs)?;
    if hello.encrypted != inner.psk.is_some() {
        return Err(HandshakeError::Auth);
    }
    if hello.name == inner.cfg.name {
        return Err(HandshakeError::SelfConnection);
    }
    let Some(psk) = &inner.psk else {
        return Ok((hello, None));
    };
    // Both handshake records are the prologue: altering either fails the key exchange.
    let (first, second) = if outbound {
        (&ours, &theirs)
    } else {
        (&theirs, &ours)
    };
    let mut prologue = wire::with_length_prefix(first);
    prologue.extend_from_slice(&wire::with_length_prefix(second));
    let params = wire::NOISE_PARAMS.parse().expect("valid noise params");
    let builder = snow::Builder::new(params)
        .psk(0, psk)
        .and_then(|b| b.prologue(&prologue))
        .map_err(|_| HandshakeError::Auth)?;
    let mut buf = [0u8; 256];
    let mut payload = [0u8; 256];
    let hs = if outbound {
        let mut hs = builder
            .build_initiator()
            .map_err(|_| HandshakeError::Auth)?;
        let n = hs
            .write_message(&[], &mut buf)
            .map_err(|_| HandshakeError::Auth)?;
        write_record(inner, stream, &buf[..n]).await?;
        let reply = read_record(inner, stream, buf.len())
            .await
            .map_err(|_| HandshakeError::Auth)?;
        hs.read_message(&reply, &mut payload)
            .map_err(|_| HandshakeError::Auth)?;
        hs
    } else {
        let mut hs = builder
            .build_responder()
            .map_err(|_| HandshakeError::Auth)?;
        let msg = read_record(inner, stream, buf.len())
            .await
            .map_err(|_| HandshakeError::Auth)?;
        hs.read_message(&msg, &mut payload)
            .map_err(|_| HandshakeError::Auth)?;
        let n = hs
            .write_message(&[], &mut buf)
            .map_err(|_| HandshakeError::Auth)?;
        write_record(inner, stream, &buf[..n]).await?;
        hs
    };
    let cipher = hs
        .into_stateless_transport_mode()
        .map_err(|_| HandshakeError::Auth)?;
    let mut nonce = 0;
    if outbound {
        let sealed = wire::seal(&cipher, &mut nonce, wire::CONFIRM)?;
        write_record(inner, stream, &sealed).await?;
        Ok((
            hello,
            Some(Sealed {
                cipher,
                send_nonce: nonce,
                recv_nonce: 0,
            }),
        ))
    } else {
        let record = read_record(inner, stream, wire::sealed_len(wire::CONFIRM.len()))
            .await
            .map_err(|_| HandshakeError::Auth)?;
        let plain = wire::open(&cipher, &mut nonce, &record).map_err(|_| HandshakeError::Auth)?;
        if plain != wire::CONFIRM {
            return Err(HandshakeError::Auth);
        }
        Ok((
            hello,
            Some(Sealed {
                cipher,
                send_nonce: 0,
                recv_nonce: nonce,
            }),
        ))
    }
}

pub(in crate::mesh) async fn write_record(
    inner: &Inner,
    w: &mut (impl AsyncWrite + Unpin),
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&wire::with_length_prefix(payload)).await?;
    inner
        .counters
        .bytes_out
        .fetch_add(payload.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

/// Reads one frame record: its first bytes must arrive by `deadline`, and after that
/// every read must make progress within `dead_after`, so a frame far larger than a
/// link moves in `dead_after` is not mistaken for a dead peer.
pub(in crate::mesh) async fn read_frame_record(
    inner: &Inner,
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, ConnError> {
    let dead = || ConnError::Dead(inner.cfg.dead_after);
    let eof = || ConnError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        let n = match tokio::time::timeout_at(deadline, r.read(&mut prefix[got..])).await {
            Ok(n) => n?,
            // The deadline passed while we waited, or while this task waited for its
            // turn on a busy runtime: bytes already waiting mean the peer is alive.
            // (`read` is cancel safe: a timed-out read consumed nothing.)
            Err(_) => tokio::time::timeout(
                Duration::ZERO,
                tokio::task::unconstrained(r.read(&mut prefix[got..])),
            )
            .await
            .map_err(|_| dead())??,
        };
        if n == 0 {
            return Err(eof());
        }
        got += n;
    }
    let len = wire::parse_length(prefix, max)?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = tokio::time::timeout(inner.cfg.dead_after, r.read(&mut buf[filled..]))
            .await
            .map_err(|_| dead())??;
        if n == 0 {
            return Err(eof());
        }
        filled += n;
    }
    inner
        .counters
        .bytes_in
        .fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(buf)
}

pub(in crate::mesh) async fn read_record(
    inner: &Inner,
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Vec<u8>, ConnError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = wire::parse_length(prefix, max)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    inner
        .counters
        .bytes_in
        .fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(buf)
}
