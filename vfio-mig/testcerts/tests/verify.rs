// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The minted certificates as a TLS peer judges them: webpki (what rustls verifies with)
//! checks each leaf's chain to its CA, its usage and its names.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use vfio_mig_testcerts::{Ca, Usage};
use webpki::{EndEntityCert, KeyUsage};

/// Verifies `leaf` against `ca` for `usage`; `Err` is webpki's refusal.
fn verify(ca: &Ca, leaf: &std::path::Path, usage: KeyUsage) -> Result<(), webpki::Error> {
    let ca_der = CertificateDer::from_pem_file(ca.pem()).unwrap();
    let anchor = webpki::anchor_from_trusted_cert(&ca_der)
        .unwrap()
        .to_owned();
    let der = CertificateDer::from_pem_file(leaf).unwrap();
    let ee = EndEntityCert::try_from(&der).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn leaves_chain_to_their_ca_with_their_usage_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca").unwrap();
    let other = Ca::new(dir.path(), "other-ca").unwrap();
    let server = ca
        .leaf(
            dir.path(),
            "dst",
            &["dst.example", "127.0.0.1"],
            Usage::Server,
        )
        .unwrap();
    let client = ca
        .leaf(dir.path(), "src", &["uri:spiffe://vm/src"], Usage::Client)
        .unwrap();
    let member = ca
        .leaf(dir.path(), "member", &["localhost"], Usage::ServerAndClient)
        .unwrap();

    verify(&ca, &server.cert, KeyUsage::server_auth()).unwrap();
    verify(&ca, &client.cert, KeyUsage::client_auth()).unwrap();
    verify(&ca, &member.cert, KeyUsage::server_auth()).unwrap();
    verify(&ca, &member.cert, KeyUsage::client_auth()).unwrap();
    // Usage and issuer are enforced: a client certificate serves no TLS server, and another
    // CA vouches for nothing this one signed.
    assert!(verify(&ca, &client.cert, KeyUsage::server_auth()).is_err());
    assert!(verify(&ca, &server.cert, KeyUsage::client_auth()).is_err());
    assert!(verify(&other, &server.cert, KeyUsage::server_auth()).is_err());

    let der = CertificateDer::from_pem_file(&server.cert).unwrap();
    let ee = EndEntityCert::try_from(&der).unwrap();
    for name in ["dst.example", "127.0.0.1"] {
        ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    assert!(ee
        .verify_is_valid_for_subject_name(&ServerName::try_from("src.example").unwrap())
        .is_err());
}

#[test]
fn keys_are_their_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca").unwrap();
    let leaf = ca.leaf(dir.path(), "host", &[], Usage::Client).unwrap();
    let mode = std::fs::metadata(&leaf.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_bad_name_is_an_error_naming_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca").unwrap();
    let e = ca
        .leaf(dir.path(), "odd", &["dst.ëxample"], Usage::Client)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("odd"), "{e}");
}
