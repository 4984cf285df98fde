"""Whether a server the run depends on (an MLflow tracking server, a configured Prefect API)
answers at all, asked once before the first stage with a short time limit: their own clients
retry for minutes, or wait without a word on one that never answers."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.parse
import urllib.request

GATEWAY_ERRORS = (502, 503, 504)  # a proxy answering for a server behind it that does not


def shown_url(url: str) -> str:
    """`url` for messages: a password in it (http://user:pw@host) replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def unanswered(url: str, timeout: float) -> str | None:
    """None where the server at `url` answers `GET /health` within `timeout` seconds: any HTTP
    answer (it may want a login) but a gateway's 502/503/504, or a TLS handshake this probe
    cannot verify (the client has its own CA and certificate settings). Else why not, in a
    few words."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]  # urllib takes no user:password@ in the host
    health = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health",
                                      "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout):  # noqa: S310 (http(s) only)
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}" if exc.code in GATEWAY_ERRORS else None
    except urllib.error.URLError as exc:
        return None if isinstance(exc.reason, ssl.SSLError) else str(exc.reason)
    except ssl.SSLError:
        return None
    except (OSError, ValueError) as exc:  # a timeout reading the answer, a malformed URL
        return str(exc) or type(exc).__name__
