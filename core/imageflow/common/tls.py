"""TLS credentials from PEM files, for servers (optionally requiring client certificates) and channels."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | str | None, what: str) -> bytes | None:
    if path is None or str(path) == "":
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {error.strerror}") from None


def server_credentials(
    cert_file: Path | str | None, key_file: Path | str | None, client_ca_file: Path | str | None = None
) -> grpc.ServerCredentials | None:
    """TLS for a listening port; with `client_ca_file`, clients must present a certificate it signed (mTLS).
    None when no certificate is configured."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise ValueError("a client CA (mTLS) needs the server's own certificate and key as well")
        return None
    cert, key = _read(cert_file, "TLS certificate"), _read(key_file, "TLS key")
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate file and a key file")
    client_ca = _read(client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: Path | str | None = None, cert_file: Path | str | None = None, key_file: Path | str | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client channel: the CA to trust (None = the system roots), and a client certificate for mTLS."""
    cert, key = _read(cert_file, "client certificate"), _read(key_file, "client key")
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA"), private_key=key, certificate_chain=cert)
