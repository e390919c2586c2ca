//! Certificates for servers started with TLS: a throwaway CA, a server certificate for
//! `127.0.0.1` and `localhost` signed by it, and a client certificate for servers that verify
//! clients. Written as PEM files into the server's temp directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The PEM files of a server's TLS setup.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed both certificates: what clients trust.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Makes a CA and the certificates, in `dir`.
pub fn certificates(dir: &Path) -> std::io::Result<TlsFiles> {
    let fail = |e: rcgen::Error| std::io::Error::other(e.to_string());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "piecework test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(fail)?)
        .map_err(fail)?;

    let leaf = |names: Vec<String>, common_name: &str| -> std::io::Result<(String, String)> {
        let key = KeyPair::generate().map_err(fail)?;
        let mut params = CertificateParams::new(names).map_err(fail)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &ca).map_err(fail)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "piecework test server",
    )?;
    let (client_cert, client_key) = leaf(vec!["client".into()], "piecework test client")?;

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.server_cert, server_cert)?;
    std::fs::write(&files.server_key, server_key)?;
    std::fs::write(&files.client_cert, client_cert)?;
    std::fs::write(&files.client_key, client_key)?;
    Ok(files)
}
