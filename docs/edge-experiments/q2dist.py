import asyncio, time, sys, json, random
from lib import *
from q2 import last_seq, wait_seq
async def main():
    hub = await connect(HUB); sa = await connect(SA); kvh = await hub.jetstream().key_value("mf_registry")
    _, info = await last_seq(sa); print("mirror config:", json.dumps(info["config"]["mirror"]))
    for run in range(int(sys.argv[1])):
        cut = random.uniform(10, 40)
        ctl("a", "cut"); await wait_noleaf("site-a"); await asyncio.sleep(cut)
        await kvh.put(f"deploy.{run}", b"v"); hs, _ = await last_seq(hub)
        ctl("a", "heal"); t0 = time.monotonic()
        probe = None
        while probe is None:
            try: await sa.request("$JS.hub.API.INFO", b"", timeout=0.5); probe = time.monotonic() - t0
            except Exception: await asyncio.sleep(0.02)
        d = await wait_seq(sa, hs, 300)
        print(f"cut {cut:4.1f}s: hub API reachable {probe:.2f}s after heal; mirror has the deploy {probe+d:.2f}s after heal", flush=True)
asyncio.run(main())
