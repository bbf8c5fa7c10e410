//! A throwaway certificate authority made with the `openssl` command (which
//! scripts/test.sh installs): the tests need real files for PostgreSQL's
//! `ssl_cert_file` and for psql's `PGSSLROOTCERT` anyway, and the CLI makes
//! them without adding a certificate-building crate to the build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and one server certificate it signed, naming 127.0.0.1 (an IP SAN:
/// what verify-full checks when the host is an address).
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

const CA_CONF: &str = "[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
CN = tidepool test CA NAME
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

const SERVER_EXT: &str = "basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl Pki {
    /// Makes the files under `dir/name-*`.
    pub fn generate(dir: &Path, name: &str) -> Pki {
        let path = |file: &str| dir.join(format!("{name}-{file}"));
        let (ca_conf, ext) = (path("ca.cnf"), path("server.ext"));
        std::fs::write(&ca_conf, CA_CONF.replace("NAME", name)).unwrap();
        std::fs::write(&ext, SERVER_EXT).unwrap();
        let pki = Pki {
            ca_cert: path("ca.crt"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
        };
        let (ca_key, csr) = (path("ca.key"), path("server.csr"));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "2", "-config"])
                .arg(&ca_conf)
                .args(ec)
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&pki.ca_cert),
        );
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-nodes", "-subj", "/CN=127.0.0.1"])
                .args(ec)
                .arg("-keyout")
                .arg(&pki.server_key)
                .arg("-out")
                .arg(&csr),
        );
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial", "2", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(&pki.ca_cert)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&pki.server_cert),
        );
        pki
    }
}

fn openssl(command: &mut Command) {
    let out = command.output().expect("the openssl command runs");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
