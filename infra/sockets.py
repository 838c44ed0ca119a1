"""The sockets this process serves on, and the upstream connections it cuts.

Granian binds and accepts; it has no setting for the accepted sockets' send buffer. Linux gives
an accepted socket the listening socket's SO_SNDBUF (and, once set, turns off the buffer's
autotuning, which would let it grow to `net.ipv4.tcp_wmem`'s maximum, 4 MB on many systems). So
setting it on the listening socket bounds what the kernel holds for a client that stops reading:
past it the server's writes wait, the relay's queue fills and the upstream is no longer read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

logger = logging.getLogger(__name__)


def limit_client_send_buffers(size: int) -> int:
    """Set SO_SNDBUF to `size` bytes on this process's listening TCP sockets, so that every
    connection accepted from now on gets it (the kernel doubles it for its own bookkeeping).
    Returns how many listening sockets were set; 0 where there is no /proc (not Linux)."""
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for name in descriptors:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            listening = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
        with listening:  # closes the duplicate only
            try:
                if (
                    listening.family in (socket.AF_INET, socket.AF_INET6)
                    and listening.type == socket.SOCK_STREAM
                    and listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                ):
                    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                    count += 1
            except OSError as error:
                logger.warning("could not set the send buffer of a listening socket: %s", error)
    return count


def shut_down_now(transport: asyncio.BaseTransport) -> None:
    """Send the peer the end of the connection (a FIN) now, before the transport is closed.

    `close()` on an asyncio or uvloop transport only schedules its socket's close for the loop's
    next pass, after every callback already due: when many clients leave at once that pass is
    tens of milliseconds away, and an upstream goes on generating (and billing) meanwhile. The
    shutdown goes through a duplicate descriptor (uvloop's transport sockets refuse `shutdown()`);
    it acts on the connection, and closing the duplicate leaves the transport's own descriptor
    for its `close()`. Never raises: a socket already gone has nothing left to cut.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        duplicate = os.dup(sock.fileno())
    except (OSError, ValueError):  # closed already (fileno() -1)
        return
    try:
        connection = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return
    with connection:  # closes the duplicate only
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more
            pass
