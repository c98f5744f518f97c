//! HTTPS for the fixture, as every real API server serves it: a test CA made per fixture
//! (never written to the machine's trust store), a server certificate for `127.0.0.1` and
//! `localhost` signed by it, and the CA handed to clients only through the kubeconfig's
//! `certificate-authority-data` — so a client that passes has really verified the chain
//! with the CA from its kubeconfig.
//!
//! The fixture also notices what a careless client would do against a TLS server: a
//! connection whose first byte is not a TLS handshake record (plaintext HTTP, a fallback) or
//! whose handshake fails (the client rejected the certificate) is counted and closed; see
//! [`TlsStats`].

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpStream;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
    server::TlsStream,
    TlsAcceptor,
};

/// The first byte of a TLS record carrying a handshake message (the ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A CA certificate and its key.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    /// A fresh CA named `name` (a test that needs "the wrong CA" makes a second one).
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("test CA: key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("test CA: params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("test CA: self-sign");
        TestCa { cert, key }
    }

    /// The CA certificate, PEM (what `certificate-authority-data` carries, base64-encoded).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate chain and key for `127.0.0.1` and `localhost`.
    fn server_cert(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()])
            .expect("server cert params");
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server cert: sign");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], der)
    }
}

/// What the TLS side saw that a well-behaved client never causes.
#[derive(Debug, Default)]
pub struct TlsStats {
    plaintext: AtomicUsize,
    failed_handshakes: AtomicUsize,
}

impl TlsStats {
    /// Connections that spoke something other than TLS first (e.g. plaintext HTTP).
    pub fn plaintext_connections(&self) -> usize {
        self.plaintext.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (typically: the client did not trust the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }
}

/// The server side: the acceptor, the CA clients must trust, and the counters.
pub struct ServerTls {
    ca: TestCa,
    acceptor: TlsAcceptor,
    pub stats: Arc<TlsStats>,
}

impl ServerTls {
    /// A new CA and a server certificate signed by it.
    pub fn generate() -> ServerTls {
        let ca = TestCa::new("datalab-guard API fixture CA");
        let (chain, key) = ca.server_cert();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        ServerTls {
            ca,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            stats: Arc::default(),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The TLS session on `stream`, or None (counted) when the client does not speak TLS or
    /// rejects the certificate.
    pub async fn accept(&self, stream: TcpStream) -> Option<TlsStream<TcpStream>> {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                self.stats.plaintext.fetch_add(1, Ordering::SeqCst);
                return None;
            }
        }
        match self.acceptor.accept(stream).await {
            Ok(tls) => Some(tls),
            Err(_) => {
                self.stats.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_server_certificate_are_made() {
        let tls = ServerTls::generate();
        let pem = tls.ca_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        // Two CAs are never the same (the "wrong CA" test depends on it).
        assert_ne!(pem, TestCa::new("other").pem());
    }
}
