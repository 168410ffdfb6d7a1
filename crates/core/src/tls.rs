//! TLS on the client API: turns etcd-style PEM file options (`--cert-file`,
//! `--key-file`, `--client-cert-auth`, `--trusted-ca-file`) into tonic's server and
//! client configurations and into the rustls acceptor of the non-member proxy.
//!
//! A member forwarding a request to another member's client URL (leader forwarding,
//! the proxy of a node that is not a member yet) is a client like any other: it trusts
//! the trusted CA (or the system roots without one) and, under client-certificate
//! authentication, presents its own certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS file could not be read or does not hold what it should.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named in the configuration cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its PEM content is unusable.
    #[error("{what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The options contradict each other.
    #[error("{0}")]
    Config(String),
}

/// The server side of client-API TLS, as etcd's flags name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// `--cert-file`: the member's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// `--key-file`: its private key (PEM).
    pub key_file: PathBuf,
    /// `--client-cert-auth`: refuse clients without a certificate signed by the trusted CA.
    pub client_cert_auth: bool,
    /// `--trusted-ca-file`: the CA that signs client certificates (and, for forwarding,
    /// other members' certificates).
    pub trusted_ca_file: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read(what, path)?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read("key file", path)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| pem_error("key file", path, e))
}

/// How an HTTPS client checks servers: against the CA certificates in `ca_file`, or
/// against the system's roots when there is none.
pub fn https_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in certs("CA file", path)? {
                roots.add(c).map_err(|e| pem_error("CA file", path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A system root rustls cannot use is skipped, as browsers do.
                let _ = roots.add(c);
            }
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Checks that every file is readable and parses, so a bad path fails at start.
    pub fn check(&self) -> Result<(), TlsError> {
        if self.client_cert_auth && self.trusted_ca_file.is_none() {
            return Err(TlsError::Config(
                "--client-cert-auth needs --trusted-ca-file".into(),
            ));
        }
        self.rustls_server_config().map(|_| ())
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read("cert file", &self.cert_file)?,
            read("key file", &self.key_file)?,
        ))
    }

    /// How this member dials another member's client URL.
    pub fn member_client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut cfg = ClientTlsConfig::new();
        cfg = match &self.trusted_ca_file {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("trusted CA file", ca)?)),
            None => cfg.with_native_roots(),
        };
        if self.client_cert_auth {
            cfg = cfg.identity(self.identity()?);
        }
        Ok(cfg)
    }

    /// The client port's configuration: gRPC clients negotiate HTTP/2, HTTP clients
    /// (the JSON gateway, probes, curl) may ask for HTTP/1.1.
    pub fn client_port_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = self.rustls_config()?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The configuration of a plain HTTP/1.1 service (locksmith's FleetLock server).
    pub fn http1_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = self.rustls_config()?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The configuration of the non-member proxy, which forwards gRPC only.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = self.rustls_config()?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn rustls_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let chain = certs("cert file", &self.cert_file)?;
        let key = private_key(&self.key_file)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if self.client_cert_auth {
            let ca_file = self.trusted_ca_file.as_ref().ok_or_else(|| {
                TlsError::Config("--client-cert-auth needs --trusted-ca-file".into())
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("trusted CA file", ca_file)? {
                roots
                    .add(c)
                    .map_err(|e| pem_error("trusted CA file", ca_file, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| pem_error("trusted CA file", ca_file, e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(chain, key)
            .map_err(|e| pem_error("cert file", &self.cert_file, e))
    }
}

/// How a member dials other members' client URLs: plain, or with TLS.
#[derive(Clone, Debug, Default)]
pub struct MemberDialer {
    tls: Option<ClientTlsConfig>,
}

impl MemberDialer {
    /// Dials with `tls` when the client API is served with TLS.
    pub fn new(tls: Option<&ServerTls>) -> Result<MemberDialer, TlsError> {
        Ok(MemberDialer {
            tls: tls.map(ServerTls::member_client_config).transpose()?,
        })
    }

    /// An endpoint for a member's published client URL.
    pub fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, tonic::Status> {
        let bad = |e: &dyn std::fmt::Display| {
            tonic::Status::unavailable(format!("member client URL {url}: {e}"))
        };
        let ep = tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|e| bad(&e))?;
        match &self.tls {
            Some(tls) if url.starts_with("https://") => {
                ep.tls_config(tls.clone()).map_err(|e| bad(&e))
            }
            _ => Ok(ep),
        }
    }
}
