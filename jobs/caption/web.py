"""Fetching an image over HTTP(S) from a list of URLs that may come from anywhere.

- One deadline for the whole request, redirects included (connect, headers, body): a server
  that sends a byte every few seconds is cut off at `timeout`, not held for the shard's timeout.
  A timer shuts the socket down at the deadline, so no blocking read outlives it.
- Where a URL may point: http and https only; at most MAX_REDIRECTS redirects, each hop checked
  like the first; the address a name resolves to is checked before connecting, and the
  connection goes to that very address (a name cannot resolve to one address for the check
  and another for the connection). Link-local and cloud-metadata addresses are always refused
  (`refused_address`); loopback and private addresses are allowed unless the policy's
  `allow_private` is False (internal image servers are common; refuse them for an untrusted
  list).
- Polite: at most HOST_IN_FLIGHT requests at once to one host from one process, at most
  `host_rate` requests a second to it when the policy sets one, and a `Retry-After` of a 429
  or 503 answer is honoured (up to MAX_RETRY_AFTER_S) before that host is asked again.
- Transient failures (timeouts, resets, 5xx, 429) are retried `attempts` times in all with
  backoff; an HTTP error status is `http_<code>`.
- Connections are kept alive: a connection whose answer was read whole and that the server
  keeps open goes back to a per-process pool (per scheme, host, port and policy; at most
  HOST_IN_FLIGHT idle per host, each for at most IDLE_S), and the next request to that host
  reuses it, sparing a TCP and TLS handshake per image. A pooled connection was opened to a
  checked address, and every request on it meets its own deadline; one the server closed
  meanwhile is replaced by a fresh connection, without counting a try.

`RESOLVE` is the name lookup (socket.getaddrinfo); tests replace it to make a name resolve to
an address that must be refused, and no packet is ever sent there.
"""

from __future__ import annotations

import atexit
import email.utils
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from capfleet.model.images import TOO_LARGE, ImageError

MAX_IMAGE_BYTES = 64 * 2**20  # a 100-megapixel JPEG is well under this
HTTP_TIMEOUT_S = 20.0  # the whole request, redirects included
HTTP_ATTEMPTS = 3
HTTP_BACKOFF_S = 0.5
MAX_REDIRECTS = 5
HOST_IN_FLIGHT = 128  # requests at once to one host from one process (its fetch threads)
IDLE_S = 30.0  # a kept-alive connection unused this long is closed, not reused
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for: the image fails
USER_AGENT = "capfleet (batch image captioning)"
TIMEOUT, UNREACHABLE = "timeout", "unreachable"
REFUSED_ADDRESS, REFUSED_SCHEME, TOO_MANY_REDIRECTS = (
    "refused_address",
    "refused_scheme",
    "too_many_redirects",
)
REDIRECTS = (301, 302, 303, 307, 308)

# Cloud metadata services beyond the link-local range: AWS's IPv6 endpoint, Alibaba's.
METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # DNS64's IPv6 names of IPv4 hosts

RESOLVE = socket.getaddrinfo  # replaced by tests: a name -> addresses, without a packet


@dataclass(frozen=True)
class UrlPolicy:
    """Where URLs may point and how hard a host may be asked (a caption job's flags)."""

    allow_private: bool = True  # loopback and private addresses (--refuse-private-urls)
    host_rate: float = 0.0  # requests a second to one host from one worker; 0 = no bound


DEFAULT_POLICY = UrlPolicy()


def address_problem(ip: str, allow_private: bool) -> str | None:
    """Why an address may not be fetched from, or None."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):  # an IPv4 address carried in IPv6: judge it
        if addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        elif addr in NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif addr.sixtofour:
            addr = addr.sixtofour
        elif addr.teredo:
            addr = addr.teredo[1]
    if addr.is_link_local or any(addr in net for net in METADATA):
        return f"{addr} is a link-local or cloud-metadata address"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return f"{addr} is not a host"
    if not allow_private and (addr.is_loopback or addr.is_private or not addr.is_global):
        return f"{addr} is a loopback or private address (private addresses are refused)"
    return None


class _Hosts:
    """Per host, in this process: requests in flight (bounded), the time before which a
    Retry-After asked not to be called again, and the next start a rate allows."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self.not_before: dict[str, float] = {}
        self._next_start: dict[str, float] = {}

    def pace(self, host: str, rate: float) -> None:
        """Wait for this request's turn at `rate` requests a second to `host` (0: at once).
        The wait comes before the request's deadline starts: politeness is no server's delay."""
        if rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start.get(host, 0.0))
            self._next_start[host] = start + 1.0 / rate
        if start > now:
            time.sleep(start - now)

    def slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._slots.setdefault(host, threading.BoundedSemaphore(HOST_IN_FLIGHT))

    def wait_turn(self, host: str, deadline: float) -> bool:
        """Wait out the host's Retry-After; False when it lasts past the deadline."""
        until = self.not_before.get(host, 0.0)
        if until > deadline:
            return False
        if until > time.monotonic():
            time.sleep(until - time.monotonic())
        return True


HOSTS = _Hosts()


class _Pool:
    """Idle kept-alive connections, newest last, per (scheme, host, port, allow_private)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[tuple[socket.socket, float]]] = {}

    def take(self, key: tuple) -> socket.socket | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                sock, since = idle.pop()
                if now - since < IDLE_S:
                    return sock
                sock.close()
        return None

    def give(self, key: tuple, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < HOST_IN_FLIGHT:
                idle.append((sock, time.monotonic()))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock, _ in socks:
                sock.close()


POOL = _Pool()
atexit.register(POOL.close)
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def read_http(
    url: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float | None = None,
    attempts: int = HTTP_ATTEMPTS,
    policy: UrlPolicy = DEFAULT_POLICY,
) -> bytes | ImageError:
    """GET `url` under the policy (`timeout`: the deadline of each try, HTTP_TIMEOUT_S when
    None); the bytes, or an ImageError whose reason says why."""
    timeout = HTTP_TIMEOUT_S if timeout is None else timeout
    error = ImageError(UNREACHABLE, url)
    for attempt in range(attempts):
        if attempt:
            time.sleep(HTTP_BACKOFF_S * 2 ** (attempt - 1))
        result, retry = _get(url, max_bytes, timeout, policy)
        if not retry:
            return result
        error = result
    return error


def _get(url: str, max_bytes: int, timeout: float, policy: UrlPolicy):
    """One try, redirects followed: (bytes or ImageError, whether another try may help). A
    malformed URL or Location (a bad port, brackets, a path that is no ASCII) is one error row,
    never an exception that would fail the whole shard."""
    deadline = None
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as e:
            return ImageError(UNREACHABLE, f"{url}: a malformed URL ({e})"), False
        if parts.scheme not in ("http", "https") or not host:
            return ImageError(REFUSED_SCHEME, f"{url}: only http and https URLs are fetched"), False
        HOSTS.pace(host, policy.host_rate)  # politeness waits are no part of the deadline
        if not HOSTS.wait_turn(host, time.monotonic() + MAX_RETRY_AFTER_S):
            return ImageError(TIMEOUT, f"{url}: the host asked to wait too long"), False
        deadline = deadline or time.monotonic() + timeout  # from the first request's turn
        with HOSTS.slot(host):
            answer = _request(parts, port, max_bytes, deadline, policy.allow_private)
        if isinstance(answer, str):  # a redirect
            try:
                url = urllib.parse.urljoin(url, answer)
            except ValueError as e:
                return ImageError(UNREACHABLE, f"{url}: a malformed redirect ({e})"), False
            continue
        return answer
    return ImageError(TOO_MANY_REDIRECTS, f"{url}: more than {MAX_REDIRECTS} redirects"), False


def _targets(url: str, host: str, port: int, allow_private: bool):
    """The addresses `host` resolves to that may be fetched from, or (ImageError, retry?)."""
    try:
        infos = RESOLVE(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return ImageError(UNREACHABLE, f"{url}: {e}"), True
    allowed, problems = [], []
    for family, _, _, _, sockaddr in infos:
        why = address_problem(sockaddr[0], allow_private)
        if why is None:
            allowed.append((family, sockaddr))
        else:
            problems.append(why)
    if not allowed:
        return ImageError(REFUSED_ADDRESS, f"{url}: {problems[0]}"), False
    return allowed


def _request(parts, port: int | None, max_bytes: int, deadline: float, allow_private: bool):
    """One GET on a connection to a checked address (each allowed one in turn, as a client
    falls back from IPv6 to IPv4): (bytes or ImageError, retry?) or a redirect's Location."""
    url = urllib.parse.urlunsplit(parts)
    port = port or (443 if parts.scheme == "https" else 80)
    key = (parts.scheme, parts.hostname, port, allow_private)
    while (sock := POOL.take(key)) is not None:  # a kept-alive connection, checked when opened
        timer = _Cutoff(sock, max(0.0, deadline - time.monotonic()))
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            return _exchange(url, parts, port, sock, max_bytes, timer, key)
        except (OSError, ValueError, http.client.HTTPException) as e:
            sock.close()
            if not isinstance(e, _STALE) or timer.fired:
                return _broken(url, e, timer)
            # else the server closed it while idle: another, or a fresh one
        finally:
            timer.cancel()
    targets = _targets(url, parts.hostname, port, allow_private)
    if isinstance(targets, tuple):
        return targets
    error: tuple = (ImageError(UNREACHABLE, url), True)
    for family, sockaddr in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ImageError(TIMEOUT, f"{url}: no whole answer within the deadline"), True
        sock = socket.socket(family, socket.SOCK_STREAM)
        timer = _Cutoff(sock, remaining)
        try:
            sock.settimeout(remaining)
            try:
                sock.connect(sockaddr)
            except OSError as e:
                if timer.fired:
                    return ImageError(TIMEOUT, f"{url}: no connection within the deadline"), True
                error = (ImageError(UNREACHABLE, f"{url}: {type(e).__name__}: {e}"), True)
                continue  # the next address
            if parts.scheme == "https":  # the handshake, too, within the deadline
                sock = _tls().wrap_socket(
                    sock, server_hostname=parts.hostname, do_handshake_on_connect=False
                )
                timer.sock = sock
                if timer.fired:
                    raise TimeoutError("the request's deadline passed")
                sock.do_handshake()
            answer = _exchange(url, parts, port, sock, max_bytes, timer, key)
            sock = None  # _exchange closed it, or pooled it
            return answer
        except (OSError, ValueError, http.client.HTTPException) as e:
            return _broken(url, e, timer)
        finally:
            timer.cancel()
            if sock is not None:
                sock.close()
    return error


def _broken(url: str, e: Exception, timer: _Cutoff) -> tuple[ImageError, bool]:
    """The row of a request that failed on its connection: a timeout where the deadline cut
    it (or a socket timed out), else unreachable; either may be tried again."""
    if timer.fired or isinstance(e, TimeoutError):
        return ImageError(TIMEOUT, f"{url}: no whole answer within the deadline"), True
    return ImageError(UNREACHABLE, f"{url}: {type(e).__name__}: {e}"), True


def _exchange(url: str, parts, port: int, sock, max_bytes: int, timer: _Cutoff, key: tuple):
    """The GET on this very connection (to a checked address) and its answer. The connection
    goes back to the pool when the answer was read whole and the server keeps it open; else
    it is closed. On an exception the caller closes it."""
    conn = http.client.HTTPConnection(parts.hostname, port)
    conn.sock = sock
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
    resp = conn.getresponse()
    data = None
    if resp.status in REDIRECTS and resp.getheader("Location"):
        answer = resp.getheader("Location")
    elif resp.status != 200:
        answer = _status_error(url, resp)
    else:
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            answer = too_large(int(length), max_bytes), False
        else:
            data = resp.read(max_bytes + 1)
            if timer.fired:
                raise TimeoutError("the request's deadline passed")
            big = len(data) > max_bytes
            answer = (too_large(len(data), max_bytes) if big else data), False
    whole = data is not None and len(data) <= max_bytes and resp.isclosed()
    if whole and not resp.will_close and not timer.fired:
        timer.cancel()
        POOL.give(key, sock)
    else:
        sock.close()
    return answer


_TLS: list = []  # one client context per process: loading the CA store is not free


def _tls() -> ssl.SSLContext:
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]


def _status_error(url: str, resp) -> tuple[ImageError, bool]:
    error = ImageError(f"http_{resp.status}", f"{url}: {resp.reason}")
    if resp.status in (429, 503):
        wait = _retry_after(resp.getheader("Retry-After"))
        if wait is not None:
            if wait > MAX_RETRY_AFTER_S:
                return error, False  # the host asks for longer than an image is worth
            host = urllib.parse.urlsplit(url).hostname or ""
            HOSTS.not_before[host] = max(HOSTS.not_before.get(host, 0.0), time.monotonic() + wait)
    return error, resp.status == 429 or resp.status >= 500


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds, or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def too_large(size: int, max_bytes: int) -> ImageError:
    """The row of an image over the per-image cap (every reader, file, HTTP or cell, says it
    alike)."""
    return ImageError(TOO_LARGE, f"{size} bytes exceeds the {max_bytes}-byte cap per image")


class _Cutoff:
    """Shuts a socket down at the deadline, so that any blocked read or write returns."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.fired = sock, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:  # the plain socket's shutdown, also under TLS (an SSLSocket's would unwrap it)
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def cancel(self) -> None:
        self._timer.cancel()
