//! Test certificates made with rcgen: a CA, and certificates it signs for `localhost` or given
//! names and addresses (valid or expired). Used by the TLS tests of the CLI, of the node agent
//! and of replication.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

pub struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A certificate for `localhost` (PEM certificate, PEM key), expired if `expired`.
    pub fn issue(&self, expired: bool) -> (String, String) {
        self.issue_for(&["localhost"], expired)
    }

    /// A certificate for `names` (host names or IP addresses), expired if `expired`.
    pub fn issue_for(&self, names: &[&str], expired: bool) -> (String, String) {
        let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }
}
