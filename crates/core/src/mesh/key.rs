//! The mesh key: the 32-byte pre-shared key of every encrypted mesh connection.
//!
//! Holders of the key are cluster members. It comes either from `meshd keygen` (256
//! random bits, base64, used as the key directly) or from a human password, stretched
//! with Argon2id (salt from the cluster token) so a captured handshake does not make
//! guessing the password cheap.
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;

/// Length of a mesh key in bytes.
pub const KEY_BYTES: usize = 32;

/// The pre-shared key of the mesh's Noise handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshKey([u8; KEY_BYTES]);

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(..)")
    }
}

/// Where a mesh key came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The secret was a generated key (base64 of 32 bytes), used as is.
    Generated,
    /// The secret was a password, stretched with Argon2id.
    Password,
}

/// Argon2id cost of stretching a password: OWASP's first recommendation (19 MiB, two
/// passes, one lane). It runs once per start.
const KDF_MEMORY_KIB: u32 = 19 * 1024;
const KDF_PASSES: u32 = 2;

impl MeshKey {
    /// A fresh random key.
    pub fn generate() -> MeshKey {
        MeshKey(rand::random())
    }

    /// The key as `meshd keygen` prints it: standard base64 of the 32 bytes.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The key of a secret (file contents or `MESHD_PASSWORD`, surrounding white space
    /// removed): a generated key (base64 of exactly 32 bytes) is used directly; anything
    /// else is a password, stretched with Argon2id salted by the cluster token, so
    /// clusters with other tokens get other keys from the same password.
    pub fn from_secret(secret: &[u8], cluster_token: &str) -> (MeshKey, KeySource) {
        let secret = secret.trim_ascii();
        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(secret) {
            if let Ok(key) = <[u8; KEY_BYTES]>::try_from(raw.as_slice()) {
                return (MeshKey(key), KeySource::Generated);
            }
        }
        let params = Params::new(KDF_MEMORY_KIB, KDF_PASSES, 1, Some(KEY_BYTES))
            .expect("constant Argon2 parameters are valid");
        let salt = format!("meshd mesh key / cluster token {cluster_token}");
        let mut key = [0u8; KEY_BYTES];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(secret, salt.as_bytes(), &mut key)
            .expect("Argon2 accepts any password and a salt of 8 bytes or more");
        (MeshKey(key), KeySource::Password)
    }

    /// The raw key bytes (the Noise PSK).
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_and_passwords_are_stretched_per_token() {
        let k = MeshKey::generate();
        let text = format!("{}\n", k.to_base64());
        assert_eq!(text.trim().len(), 44);
        assert_eq!(
            MeshKey::from_secret(text.as_bytes(), "t1"),
            (k.clone(), KeySource::Generated)
        );
        // The token does not change a generated key.
        assert_eq!(MeshKey::from_secret(text.as_bytes(), "t2").0, k);
        assert_ne!(MeshKey::generate(), k);

        let (p1, src) = MeshKey::from_secret(b"correct horse", "t1");
        assert_eq!(src, KeySource::Password);
        assert_eq!(MeshKey::from_secret(b"correct horse\n", "t1").0, p1);
        assert_ne!(MeshKey::from_secret(b"correct horse", "t2").0, p1);
        assert_ne!(MeshKey::from_secret(b"correct horsf", "t1").0, p1);
        // Base64 of another length is a password, not a key.
        assert_eq!(
            MeshKey::from_secret(b"aGVsbG8=", "t1").1,
            KeySource::Password
        );
        assert_eq!(format!("{p1:?}"), "MeshKey(..)");
    }
}
