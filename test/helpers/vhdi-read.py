"""libvhdi's reading of a VHDX, without FUSE: writes the whole virtual disk to stdout.

Usage: /usr/bin/python3 vhdi-read.py <file.vhdx>   (pyvhdi: Debian package python3-libvhdi)

Parents of a differencing disk are found as vhdimount finds them: the basename of the parent filename
libvhdi reports (any of / or \\ as separator), in the child's directory. libvhdi checks the linkage.
"""
import os
import sys

import pyvhdi

CHUNK = 4 << 20
opened = []  # keep every level alive: set_parent does not, and a collected parent reads as "missing file IO handle"


def open_chain(path):
    f = pyvhdi.file()
    f.open(path)
    opened.append(f)
    parent = f.parent_filename if f.disk_type == pyvhdi.disk_types.DIFFERENTIAL else None
    if parent:
        base = parent.replace("\\", "/").rsplit("/", 1)[-1]
        f.set_parent(open_chain(os.path.join(os.path.dirname(path), base)))
    return f


def main():
    disk = open_chain(sys.argv[1])
    out = sys.stdout.buffer
    left = disk.media_size
    while left > 0:
        data = disk.read_buffer(min(CHUNK, left))
        if not data:
            sys.exit(f"vhdi-read: short read, {left} bytes left")
        out.write(data)
        left -= len(data)


try:
    main()
except OSError as err:  # libvhdi's message chain is the useful part; skip the traceback
    sys.exit(f"vhdi-read: {err}")
