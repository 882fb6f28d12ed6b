"""Bridges a new pseudo-terminal (raw mode) to a unix socket, as QEMU's `-chardev pty` exposes a guest channel:
prints the pty's path, then copies bytes both ways until either side ends."""
import os
import pty
import select
import socket
import sys
import tty

master, slave = pty.openpty()
tty.setraw(slave)  # keep our slave fd open: without any holder, reads on the master fail with EIO
print(os.ttyname(slave), flush=True)
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
while True:
    ready, _, _ = select.select([master, sock], [], [])
    if master in ready:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        sock.sendall(data)
    if sock in ready:
        data = sock.recv(65536)
        if not data:
            break
        os.write(master, data)
