"""Broker URLs: several of them for a cluster, TLS, and how they appear in messages
and logs (with the password masked).

A broker address setting holds one URL or several (a cluster's nodes), as a
list or as one string with the URLs separated by commas (a comma inside a
password must be percent-encoded, as any reserved character there: ``#`` is
``%23``, ``/`` is ``%2F``, ``?`` is ``%3F``, ``@`` is ``%40``). Clients and
workers connect to the first that answers and, when a connection is lost, go on
to the next, round robin (``BrokerAddresses``).

TLS: an ``amqps://`` URL (port 5671 by default) verifies the broker's certificate
and that it was issued for the host named in the URL, against the system's CAs
or the CA file given as query parameter. This package's query parameters (taken
out before pika reads the URL; pika's own, such as ``heartbeat``, still apply)::

    amqps://user:pass@mq.example:5671/prod?tls_ca_file=/etc/dataspace/ca.pem
        &tls_cert_file=/etc/dataspace/client.pem&tls_key_file=/etc/dataspace/client.key

- ``tls_ca_file``: PEM file of the CA(s) the broker's certificate must chain to
  (default: the system's trust store);
- ``tls_cert_file``, ``tls_key_file``: a client certificate and its key (PEM), for
  a broker that asks for one (``ssl_options.verify = verify_peer``); the key may
  be in the certificate file;
- ``tls_server_name``: the name the certificate must hold when the URL's host is
  not it (e.g. an address); default the URL's host.

A path holding ``&``, ``#`` or ``%`` is percent-encoded like any query value.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pika

#: this package's URL query parameters (all about TLS)
TLS_PARAMETERS = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")
#: characters that end the user information early when not percent-encoded
_RESERVED = {"/": "%2F", "?": "%3F", "#": "%23", "[": "%5B", "]": "%5D"}


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The URLs of an address setting; ValueError if there is none."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [u.strip() for u in items if isinstance(u, str) and u.strip()]
    if not found or len(found) != len(items):
        raise ValueError(f"expected one or more broker URLs, got {mask_password(urls)!r}")
    return found


def _userinfo(url: str) -> tuple[str, str | None, str]:
    """``(scheme://, userinfo, the rest)`` as written, userinfo None when there is none.

    The userinfo runs to the last ``@``: unlike ``urlsplit``, this is right for a
    password holding an unencoded ``#``, ``/``, ``?`` or ``@`` (and may take an
    unencoded ``@`` of a vhost for one: masking too much is the safe side)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", None, url
    at = rest.rfind("@")
    if at < 0:
        return scheme + sep, None, rest
    return scheme + sep, rest[:at], rest[at + 1 :]


def mask_password(url: str | Sequence[str]) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh``; other URLs unchanged.
    Several URLs (a list, or separated by commas) are masked each. A password with
    unencoded reserved characters is masked whole as well."""
    if not isinstance(url, str):
        return ", ".join(mask_password(u) for u in url)
    if "," in url:
        return ", ".join(mask_password(u.strip()) for u in url.split(","))
    start, userinfo, rest = _userinfo(url)
    if userinfo is None or ":" not in userinfo:
        return url
    return f"{start}{userinfo.split(':', 1)[0]}:***@{rest}"


def _scrub(text: str, url: str) -> str:
    """``text`` (an error message about ``url``) without any piece of its password."""
    _, userinfo, _ = _userinfo(url)
    if userinfo is None or ":" not in userinfo:
        return text
    password = userinfo.split(":", 1)[1]
    pieces = {password, unquote(password)}
    for mark in (*_RESERVED, "@", ":"):
        pieces.update(p for piece in list(pieces) for p in piece.split(mark))
    for piece in sorted((p for p in pieces if len(p) >= 2), key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


def url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as written, in words that show no secret; None if
    nothing is seen (pika may still refuse it)."""
    _, userinfo, _ = _userinfo(url)
    if userinfo is not None and ":" in userinfo:
        for char, encoded in _RESERVED.items():
            if char in userinfo:
                return (
                    f"an unencoded {char!r} before the host (in the user name or password, "
                    f"or an '@' in the vhost): percent-encode it ({char!r} is {encoded}, "
                    "'@' is %40)"
                )
    return None


def _tls_context(url: str, options: dict[str, str]) -> pika.SSLOptions:
    """The SSLOptions of an amqps URL: hostname verified, against ``tls_ca_file`` or
    the system CAs; a client certificate when given."""
    where = mask_password(url)
    ca_file = options.get("tls_ca_file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"invalid broker URL {where}: tls_ca_file {ca_file!r}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert_file, key_file = options.get("tls_cert_file"), options.get("tls_key_file")
    if key_file and not cert_file:
        raise ValueError(f"invalid broker URL {where}: tls_key_file needs tls_cert_file")
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"invalid broker URL {where}: tls_cert_file {cert_file!r} / tls_key_file "
                f"{key_file!r}: {exc}"
            ) from None
    return pika.SSLOptions(context, server_hostname=options.get("tls_server_name") or None)


def _scheme_problem(url: str) -> str | None:
    """A broker URL is amqp:// or amqps://: pika takes an http:// one and connects to
    port 5672 of its host, vhost '/', whatever was meant."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return "expected amqp://user:password@host:port/vhost"
    if scheme.lower() not in ("amqp", "amqps"):
        return f"the scheme must be amqp:// or amqps://, not {scheme[:20]!r}"
    return None


def connection_parameters(url: str) -> pika.URLParameters:
    """pika's connection parameters for one broker URL, with the TLS parameters of
    this module applied. ValueError (its text free of the password) for a URL that
    cannot be used."""
    problem = _scheme_problem(url) or url_problem(url)
    if problem:
        raise ValueError(f"invalid broker URL {mask_password(url)}: {problem}")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ValueError(
            f"invalid broker URL {mask_password(url)}: {_scrub(str(exc), url)}"
        ) from None
    tls = {name: value for name, value in query if name in TLS_PARAMETERS}
    rest = [(name, value) for name, value in query if name not in TLS_PARAMETERS]
    plain = urlunsplit(parts._replace(query=urlencode(rest))) if tls else url
    try:
        params = pika.URLParameters(plain)
    except Exception as exc:  # pika raises assorted errors for a bad URL
        raise ValueError(
            f"invalid broker URL {mask_password(url)}: {_scrub(str(exc), url)}"
        ) from None
    if parts.scheme.lower() == "amqps":
        params.ssl_options = _tls_context(url, tls)
    elif tls:
        raise ValueError(
            f"invalid broker URL {mask_password(url)}: the TLS parameters "
            f"({', '.join(sorted(tls))}) need an amqps:// URL"
        )
    return params


def tls_context_of(url: str) -> ssl.SSLContext | None:
    """The TLS context an ``amqps`` URL asks for (None for ``amqp``): what the
    management API over https is checked with as well."""
    params = connection_parameters(split_urls(url)[0])
    return params.ssl_options.context if params.ssl_options else None


def causes(exc: BaseException | None, seen: set[int] | None = None):
    """``exc`` and every exception pika wrapped inside it, outermost first (in
    ``exceptions``, ``exception``, ``args`` or the chained exceptions): pika
    reports a refused port or a TLS refusal several wrappers deep."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen or not isinstance(exc, BaseException):
        return
    seen.add(id(exc))
    yield exc
    inner = [*(getattr(exc, "exceptions", None) or ()), getattr(exc, "exception", None)]
    inner += [a for a in exc.args if isinstance(a, BaseException)]
    inner += [exc.__cause__, exc.__context__]
    for item in inner:
        yield from causes(item, seen)


def _ssl_errors(exc: BaseException | None):
    """The ssl.SSLErrors inside ``exc``."""
    return (error for error in causes(exc) if isinstance(error, ssl.SSLError))


def tls_failure(exc: BaseException) -> tuple[str, bool] | None:
    """``(one line saying what TLS refused, whether retrying cannot help)`` for a
    connection error that is a TLS failure; None for any other error.

    A certificate that does not verify (another CA, another host name, expired),
    a plain-AMQP port given to ``amqps`` or the broker's refusal of ours is
    configuration: retrying cannot help. A handshake cut short may be a restart."""
    for error in _ssl_errors(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = error.verify_message or str(error)
            return (
                f"TLS: the broker's certificate was refused: certificate verify failed: {detail}",
                True,
            )
        reason = getattr(error, "reason", None) or ""
        if reason == "WRONG_VERSION_NUMBER":
            return ("TLS: the broker does not speak TLS on that port (amqps to amqp?)", True)
        if "ALERT" in reason:
            return (f"TLS: the broker refused the connection: {reason}", True)
        return (f"TLS: {str(error).strip() or type(error).__name__}", False)
    return None
