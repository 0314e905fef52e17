import asyncio, time
from lib import *
async def main():
    await wait_leaf("hub", 2)
    nc = await connect(SA)
    for run in range(3):
        ctl("a", "blackhole"); t0 = time.monotonic()
        # poll both sides
        site = hub = None
        while site is None or hub is None:
            if site is None and leafs("site-a") == 0: site = time.monotonic() - t0
            if hub is None and leafs("hub") == 1: hub = time.monotonic() - t0
            await asyncio.sleep(0.05)
        # first fast no-responders after detection
        ms, r = await api(nc, "$JS.hub.API", "INFO", timeout=2)
        print(f"run {run}: site-a dropped leaf after {site:.1f}s, hub after {hub:.1f}s; then hub API: {type(r).__name__} in {ms:.1f}ms")
        ctl("a", "heal"); d = await wait_leaf("hub", 2); print(f"  healed; hub sees leaf after {d:.2f}s")
asyncio.run(main())
