import asyncio, json, time, socket, urllib.request
import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

HUB = "nats://127.0.0.1:24222"
SA = "nats://127.0.0.1:24301"
SB = "nats://127.0.0.1:24302"
MON = {"hub": 28222, "site-a": 28301, "site-b": 28302}
CTL = {"a": 27601, "b": 27602}

def ctl(site, cmd):
    s = socket.create_connection(("127.0.0.1", CTL[site]))
    s.sendall((cmd + "\n").encode())
    r = s.recv(100).decode().strip()
    s.close()
    return r

def mon(server, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{MON[server]}/{path}", timeout=2) as r:
        return json.loads(r.read())

def leafs(server):
    return mon(server, "leafz")["leafnodes"]

async def connect(url, name="t"):
    return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

async def api(nc, prefix, op, body=None, timeout=2.0):
    """Raw JetStream API request; returns (ms, reply-json or exception)."""
    t = time.perf_counter()
    try:
        m = await nc.request(f"{prefix}.{op}", json.dumps(body).encode() if body is not None else b"", timeout=timeout)
        return (time.perf_counter() - t) * 1000, json.loads(m.data) if m.data else {}
    except Exception as e:
        return (time.perf_counter() - t) * 1000, e

async def wait_leaf(server, n, timeout=30):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            if leafs(server) >= n:
                return time.monotonic() - t
        except Exception:
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{server}: leaf count never reached {n}")

async def wait_noleaf(server, timeout=300):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if leafs(server) == 0:
            return time.monotonic() - t
        await asyncio.sleep(0.01)
    raise RuntimeError("leaf never went down")
