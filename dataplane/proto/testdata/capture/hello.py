#!/usr/bin/env python3
"""TLS ClientHello capture listener and decoder (stdlib only).

  hello.py listen OUT   accept one connection on 127.0.0.1 (free port, printed on
                        stdout), save the records up to the end of the ClientHello
  hello.py describe F   print the MANIFEST fields of a captured hello
"""
import socket
import struct
import sys


def split_hello(buf):
    """Return (records, hello_body) once buf holds the whole ClientHello, else None.

    records is the length of the prefix of buf that ends with the record completing
    the hello. Raises ValueError on anything that is not a ClientHello.
    """
    pos, hs, records = 0, b"", 0
    while len(buf) >= pos + 5:
        ctype, _ver, length = struct.unpack("!BHH", buf[pos:pos + 5])
        if ctype != 0x16:
            raise ValueError(f"record type {ctype:#x} is not handshake")
        if len(buf) < pos + 5 + length:
            return None
        hs += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
        records += 1
        if len(hs) >= 4:
            if hs[0] != 1:
                raise ValueError(f"handshake type {hs[0]} is not ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if len(hs) >= need:
                if len(hs) != need:
                    raise ValueError("ClientHello does not end on a record boundary")
                return pos, records, hs[4:need]
    return None


def listen(out):
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    buf = b""
    while (done := split_hello(buf)) is None:
        chunk = conn.recv(65536)
        if not chunk:
            sys.exit(f"connection closed after {len(buf)} bytes")
        buf += chunk
    with open(out, "wb") as f:
        f.write(buf[:done[0]])
    conn.close()


def describe(path):
    data = open(path, "rb").read()
    end, records, body = split_hello(data)
    assert end == len(data), "trailing bytes after the ClientHello"
    p = 2 + 32                         # legacy_version, random
    p += 1 + body[p]                   # legacy_session_id
    p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher_suites
    p += 1 + body[p]                   # legacy_compression_methods
    ext_end = p + 2 + int.from_bytes(body[p:p + 2], "big")
    assert ext_end == len(body), "extensions do not fill the ClientHello"
    p += 2
    sni, alpn, ech = "-", "-", 0
    while p < ext_end:
        etype, elen = struct.unpack("!HH", body[p:p + 4])
        ext = body[p + 4:p + 4 + elen]
        p += 4 + elen
        if etype == 0:                 # server_name: list<type(1) len(2) name>
            assert int.from_bytes(ext[:2], "big") == len(ext) - 2 and ext[2] == 0
            n = int.from_bytes(ext[3:5], "big")
            assert 5 + n == len(ext)
            sni = ext[5:5 + n].decode("ascii")
        elif etype == 16:              # ALPN: list<len(1) protocol>
            assert int.from_bytes(ext[:2], "big") == len(ext) - 2
            q, protos = 2, []
            while q < len(ext):
                protos.append(ext[q + 1:q + 1 + ext[q]].decode("ascii"))
                q += 1 + ext[q]
            assert q == len(ext)
            alpn = ",".join(protos)
        elif etype == 0xFE0D:          # encrypted_client_hello
            ech = 1
    assert p == ext_end
    name = path.rsplit("/", 1)[-1]
    print(f"{name} sni={sni} alpn={alpn} ech={ech} records={records}")


if __name__ == "__main__":
    {"listen": listen, "describe": describe}[sys.argv[1]](sys.argv[2])
