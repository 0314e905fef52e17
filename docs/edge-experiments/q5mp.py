import asyncio, time, sys
from lib import *
from q5 import responder
async def main():
    ra = await responder(SA, "node-a", "mf.fwd.pinned")
    await asyncio.sleep(0.5)
    cb_ = await connect(SB)
    print("site-b client sees max_payload", cb_.max_payload, "; site-a client", ra.max_payload)
    for size in [900*1024, 2*1024*1024, 6*1024*1024]:
        t = time.perf_counter()
        try:
            r = await cb_.request("mf.fwd.pinned", b"x" * size, timeout=5); res = r.data.decode()
        except Exception as e: res = repr(e)
        print(f"  request {size/1024/1024:.2f} MiB site-b -> site-a: {res} {(time.perf_counter()-t)*1000:.0f} ms; leafs hub {leafs('hub')}")
        await asyncio.sleep(1.5)
    print("  after: hub leafs", leafs("hub"), "site-b leafs", leafs("site-b"))
    try:
        r = await cb_.request("mf.fwd.pinned", b"small", timeout=5); print("  small request afterwards:", r.data)
    except Exception as e: print("  small request afterwards:", repr(e))
asyncio.run(main())
