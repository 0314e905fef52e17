import asyncio, time, sys, json, uuid, os
from lib import *
from q3 import setup, publish_n, wait_hub, info, SITE, SB, SITE_SUBJ
PX = "b"
async def main():
    hub = await connect(HUB); sb = await connect(SB)
    for delay in [0, 10, 25]:
        ctl(PX, f"delay {delay}")
        await setup(hub, sb, True, "limits")
        await asyncio.sleep(1)
        res = []
        total = 0
        for run in range(3):
            ctl(PX, "cut"); await wait_noleaf(SITE)
            await publish_n(sb, 10000, uuid.uuid4().hex[:6]); total += 10000
            await asyncio.sleep(3)
            ctl(PX, "heal"); t0 = time.monotonic(); await wait_leaf(SITE, 1); tl = time.monotonic() - t0
            w, r = await wait_hub(hub, total)
            res.append((round(tl, 2), round(time.monotonic() - t0, 2)))
        print(f"sourcing, one-way delay {delay} ms: (leaf up, all 10k at hub) after heal = {res}", flush=True)
        # direct publish from a site client to the hub stream (the current NatsUsage publisher shape): 1000 in flight per round
        res = []
        for run in range(3):
            tag = uuid.uuid4().hex[:6]
            t0 = time.perf_counter(); d = await publish_n(sb, 10000, tag, prefix="mf.usage")
            res.append(round(d, 2))
        print(f"direct publish site->hub stream, one-way delay {delay} ms, 10k records, 1000 in flight: {res} s", flush=True)
    ctl(PX, "delay 0")
asyncio.run(main())
