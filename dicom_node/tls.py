"""TLS contexts for the SCP (server) and the sender (client) from the configuration."""

from __future__ import annotations

import ssl

import config


def server_context(settings: config.DicomNode) -> ssl.SSLContext | None:
    """The SCP's TLS context, or None for plain TCP. With ``require_client_certificate`` a
    peer must present a certificate signed by ``ca_certificates``."""
    tls = settings.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise config.ConfigError("configuration", [f"dicom.tls: cannot load the certificate, "
                                                   f"key or CA file: {exc}"]) from exc
    context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                           else ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE)
    return context


def client_context(destination: config.Destination, name: str) -> ssl.SSLContext | None:
    """The sender's TLS context for one destination, or None for plain TCP."""
    tls = destination.tls
    if tls is None:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=None if tls.ca_certificates is None else str(tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.verify_hostname
    try:
        if tls.certificate is not None:
            context.load_cert_chain(str(tls.certificate),
                                    None if tls.private_key is None else str(tls.private_key))
    except (ssl.SSLError, OSError) as exc:
        raise config.ConfigError("configuration", [f"destinations.{name}.tls: cannot load the "
                                                   f"client certificate or key: {exc}"]) from exc
    return context
