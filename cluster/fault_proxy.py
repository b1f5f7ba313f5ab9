"""A TCP fault proxy on loopback, toxiproxy-style, for taking an object store away on purpose.

    proxy = FaultProxy("127.0.0.1", moto_port)      # listens on proxy.endpoint
    proxy.set_mode("delay", delay_s=0.5)            # every chunk waits 0.5 s each way
    proxy.set_mode("refuse")                        # new connections are refused (port closed)
    proxy.set_mode("cut", cut_after=4096)           # connections close after 4 KiB from the client: mid-body
    proxy.outage(40, mode="cut")                    # cut every connection for 40 s, then pass again
    proxy.set_mode("pass")

Point AWS_ENDPOINT_URL at `proxy.endpoint` (before Ray starts: workers inherit it). The proxy
runs in threads of the process that made it; `python -m cluster.fault_proxy` runs one on its
own, switched by lines on stdin (`pass`, `refuse`, `cut 4096`, `delay 0.5`, `outage 40 cut`).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from dataclasses import dataclass

MODES = ("pass", "delay", "refuse", "cut")


@dataclass
class Fault:
    mode: str = "pass"
    delay_s: float = 0.0  # "delay": seconds each chunk waits, both ways
    cut_after: int = 0  # "cut": bytes from the client a connection carries before it is closed (0: at once)


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int = 0):
        self.target = (target_host, target_port)
        self.fault = Fault()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = self._listen(listen_port)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._restore: threading.Timer | None = None
        self.connections = 0  # accepted so far
        self.cut = 0  # connections cut by a fault
        threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True).start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        return sock

    # Switching -------------------------------------------------------------------------

    def set_mode(self, mode: str, delay_s: float = 0.0, cut_after: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"fault mode {mode!r}; one of {MODES}")
        with self._lock:
            was_refusing = self.fault.mode == "refuse"
            self.fault = Fault(mode, delay_s, cut_after)
            if mode == "refuse" and not was_refusing:
                _close_listener(self._listener)  # a closed port: connects fail with ECONNREFUSED
            elif was_refusing and mode != "refuse":
                self._listener = self._listen(self.port)
                threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True).start()
            if mode in ("cut", "refuse"):
                self._cut_all()

    def outage(self, seconds: float, mode: str = "cut") -> None:
        """Take the store away now for `seconds` (every connection cut or refused), then pass again."""
        self.set_mode(mode)
        if self._restore is not None:
            self._restore.cancel()
        self._restore = threading.Timer(seconds, lambda: self.set_mode("pass"))
        self._restore.daemon = True
        self._restore.start()

    def close(self) -> None:
        self._closed = True
        if self._restore is not None:
            self._restore.cancel()
        with self._lock:
            _close_listener(self._listener)
            self._cut_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Relaying --------------------------------------------------------------------------

    def _cut_all(self) -> None:
        for conn in list(self._conns):
            _reset(conn)
            self.cut += 1
        self._conns.clear()

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: refusing, or shut down
            self.connections += 1
            if self.fault.mode == "refuse" or self.fault.mode == "cut" and self.fault.cut_after == 0:
                _reset(client)
                self.cut += 1
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        carried = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                fault = self.fault
                if fault.mode == "delay" and fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.mode == "cut" and from_client:
                    room = fault.cut_after - carried
                    if room <= 0 or len(data) > room:
                        dst.sendall(data[:max(room, 0)])
                        self.cut += 1
                        break  # mid-body: the rest never arrives
                carried += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._conns.discard(sock)
                _reset(sock)


def _close_listener(sock: socket.socket) -> None:
    """Stop listening now. close() alone leaves the port open while another thread is blocked in
    accept() on it (Linux keeps the socket until that call returns); shutdown wakes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.fault_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port to relay to (e.g. the moto server)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = FaultProxy(host or "127.0.0.1", int(port), args.port)
    print(proxy.endpoint, flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "outage":
            proxy.outage(float(words[1]), words[2] if len(words) > 2 else "cut")
        elif words[0] in ("delay", "cut"):
            proxy.set_mode(words[0], delay_s=float(words[1]) if words[0] == "delay" else 0.0,
                           cut_after=int(words[1]) if words[0] == "cut" and len(words) > 1 else 0)
        else:
            proxy.set_mode(words[0])
        print(f"mode {proxy.fault.mode}", flush=True)
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
