"""What the bytes on the wire mean, sans I/O: the TLS ClientHello (`clienthello.py`), HTTP/1 request heads
(`heads.py`) and the incremental reading of what a connection carries (`inspection.py`). Bytes in, facts out: no
sockets, no asyncio, no decisions (the proxy checks what these report against the engine)."""
