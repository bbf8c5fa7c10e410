//! TLS towards the PostgreSQL nodes (`[cluster] sslmode`, `ssl_root_cert`):
//! one rustls client configuration, built at start, used both by the pools'
//! raw protocol connections and by the admin connections (monitor,
//! controller) that go through tokio-postgres, so that the two can never
//! disagree about what a node's certificate must be.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::der::oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, SHA_1_WITH_RSA_ENCRYPTION,
    SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};

use crate::config::{ClusterConfig, ServerSslMode};

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cluster.ssl_root_cert: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster.ssl_root_cert: {path} holds no usable CA certificate")]
    NoCertificates { path: PathBuf },
    #[error("server TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The mode and the client configuration that goes with it; cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    mode: ServerSslMode,
    connector: TlsConnector,
    postgres: MakeRustlsConnect,
}

impl ServerTls {
    pub fn from_config(cluster: &ClusterConfig) -> Result<ServerTls, ServerTlsError> {
        let provider = Arc::new(ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = match (&cluster.ssl_root_cert, cluster.sslmode) {
            (Some(path), ServerSslMode::VerifyFull) => builder
                .with_root_certificates(root_store(path)?)
                .with_no_client_auth(),
            // Validation makes verify-full come with a root certificate; the
            // other modes do not check the certificate, like libpq's.
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth(),
        };
        Ok(ServerTls {
            mode: cluster.sslmode,
            connector: TlsConnector::from(Arc::new(config.clone())),
            postgres: MakeRustlsConnect::new(config),
        })
    }

    pub fn mode(&self) -> ServerSslMode {
        self.mode
    }

    /// For the pools' own handshake after an SSLRequest.
    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// For tokio-postgres: it sends the SSLRequest itself, as `ssl_mode` says.
    pub fn postgres_connector(&self) -> MakeRustlsConnect {
        self.postgres.clone()
    }

    pub fn postgres_ssl_mode(&self) -> SslMode {
        match self.mode {
            ServerSslMode::Disable => SslMode::Disable,
            ServerSslMode::Prefer => SslMode::Prefer,
            ServerSslMode::Require | ServerSslMode::VerifyFull => SslMode::Require,
        }
    }
}

/// The tls-server-end-point channel binding data (RFC 5929) of a server
/// certificate: its hash with the hash function of its signature algorithm,
/// SHA-256 for SHA-1 (as PostgreSQL computes it). `None` for algorithms
/// without one (Ed25519) or that PostgreSQL cannot bind to either.
pub fn end_point_hash(certificate: &[u8]) -> Option<Vec<u8>> {
    let algorithm = Certificate::from_der(certificate)
        .ok()?
        .signature_algorithm
        .oid;
    Some(match algorithm {
        SHA_1_WITH_RSA_ENCRYPTION | SHA_256_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_256 => {
            Sha256::digest(certificate).to_vec()
        }
        SHA_384_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_384 => Sha384::digest(certificate).to_vec(),
        SHA_512_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_512 => Sha512::digest(certificate).to_vec(),
        _ => return None,
    })
}

fn root_store(path: &Path) -> Result<RootCertStore, ServerTlsError> {
    let pem = std::fs::read(path).map_err(|source| ServerTlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ServerTlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ServerTlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// `prefer` and `require`: encryption without authentication of the node.
/// The handshake signatures are still checked, so the session is bound to
/// whichever key the node presented.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cluster(root_cert: &Path) -> ClusterConfig {
        let text = format!(
            "[cluster]\nnodes = [\"127.0.0.1:5432\"]\nadmin_user = \"p\"\nadmin_password = \"x\"\nsslmode = \"verify-full\"\nssl_root_cert = {:?}\n\n[[users]]\nname = \"a\"\npassword = \"b\"\n",
            root_cert.display().to_string()
        );
        Config::parse(&text).unwrap().cluster
    }

    #[test]
    fn an_unusable_root_certificate_is_refused_at_start_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = ServerTls::from_config(&cluster(&missing))
            .err()
            .expect("refused");
        assert!(matches!(err, ServerTlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("cluster.ssl_root_cert"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = ServerTls::from_config(&cluster(&empty))
            .err()
            .expect("refused");
        assert!(
            matches!(err, ServerTlsError::NoCertificates { .. }),
            "{err}"
        );
    }
}
