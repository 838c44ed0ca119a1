"""The sockets this process serves on.

Granian binds and accepts; it has no setting for the accepted sockets' send buffer. Linux gives
an accepted socket the listening socket's SO_SNDBUF (and, once set, turns off the buffer's
autotuning, which would let it grow to `net.ipv4.tcp_wmem`'s maximum, 4 MB on many systems). So
setting it on the listening socket bounds what the kernel holds for a client that stops reading:
past it the server's writes wait, the relay's queue fills and the upstream is no longer read.
"""

from __future__ import annotations

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
