import asyncio, time
from lib import *
from q5 import responder
async def main():
    rb = await responder(SB, "node-b", "mf.fwd.bpinned"); ch = await connect(HUB); await asyncio.sleep(0.3)
    r = await ch.request("mf.fwd.bpinned", b"x", timeout=2); print("before cut:", r.data)
    # a request in flight when the link is cut (responder slow)
    async def slow(m):
        await asyncio.sleep(1); await m.respond(b"slow")
    await rb.subscribe("mf.fwd.bslow", cb=slow); await rb.flush(); await asyncio.sleep(0.3)
    t = time.perf_counter(); f = asyncio.create_task(ch.request("mf.fwd.bslow", b"x", timeout=5)); await asyncio.sleep(0.2)
    ctl("b", "cut")
    try: await f; print("in-flight: answered?")
    except Exception as e: print(f"request in flight at the cut: {type(e).__name__} after {(time.perf_counter()-t)*1000:.0f} ms")
    await wait_noleaf("site-b")
    for i in range(3):
        t = time.perf_counter()
        try: await ch.request("mf.fwd.bpinned", b"x", timeout=2)
        except Exception as e: print(f"request to a cut site: {type(e).__name__} in {(time.perf_counter()-t)*1000:.1f} ms")
    ctl("b", "heal"); t0 = time.monotonic(); await wait_leaf("site-b", 1)
    while True:
        try: await ch.request("mf.fwd.bpinned", b"x", timeout=0.5); break
        except Exception: await asyncio.sleep(0.01)
    print(f"after heal, forwarding works again {time.monotonic()-t0:.2f}s after heal")
asyncio.run(main())
