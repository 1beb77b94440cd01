"""Throwaway certificates for tests and the reliability harness: a CA, and a server (localhost,
127.0.0.1) and a client certificate it signs, as PEM files (``cryptography``, a test
dependency). Never for production: the keys are unencrypted and live a day."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_pki(folder: str | Path) -> dict[str, tuple[Path, Path]]:
    """"ca", "server", "client" -> (certificate, key) PEM files written into ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def issue(subject, key, issuer_key, ca, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject))
                   .issuer_name(name("test CA")).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(who, cert, key):
        paths = folder / f"{who}.pem", folder / f"{who}.key"
        paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return paths

    ca_key = ec.generate_private_key(ec.SECP256R1())
    pki = {"ca": write("ca", issue("test CA", ca_key, ca_key, True), ca_key)}
    hosts = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for who, san in (("server", hosts), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        pki[who] = write(who, issue(who, key, ca_key, False, san), key)
    return pki
