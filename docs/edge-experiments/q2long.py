import asyncio, time, sys
from lib import *
from q2 import last_seq, wait_seq
async def main():
    hub = await connect(HUB); sa = await connect(SA); kvh = await hub.jetstream().key_value("mf_registry")
    for cut in [float(x) for x in sys.argv[1:]]:
        ctl("a", "cut"); await wait_noleaf("site-a")
        await asyncio.sleep(cut)
        for i in range(10): await kvh.put(f"long.k{i}", b"x")
        hs, _ = await last_seq(hub)
        ctl("a", "heal"); t0 = time.monotonic()
        dl = await wait_leaf("site-a", 1); d = await wait_seq(sa, hs, 300)
        _, info = await last_seq(sa)
        print(f"cut {cut:.0f}s: leaf up {dl:.2f}s after heal, mirror caught up {d:.2f}s after leaf ({time.monotonic()-t0:.2f}s after heal)", flush=True)
asyncio.run(main())
