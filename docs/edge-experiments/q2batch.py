import asyncio, time, json
from lib import *
from q2 import batch, last_seq
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    hs0, _ = await last_seq(hub)
    seen = set(); stop = False
    async def poll():
        while not stop:
            s, _ = await last_seq(sa)
            if s: seen.add(s)
    p = asyncio.create_task(poll())
    bounds = set([hs0])
    for b in range(20):
        r = await batch(hub, "$KV.mf_registry.", [(f"pb.b{b}.k{i}", b"v", None) for i in range(500)])
        bounds.add(r["seq"])
    await asyncio.sleep(1); stop = True; await p
    mid = sorted(s for s in seen if s not in bounds and s > hs0)
    print(f"mirror last_seq values observed by a site poller: {len(seen)}; not on a batch boundary: {len(mid)} e.g. {mid[:5]}")
    # deletes and purges are mirrored
    kv = await hub.jetstream().key_value("mf_registry"); skv = await sa.jetstream().key_value("mf_registry")
    await kv.put("del.me", b"1"); await kv.delete("del.me"); await kv.put("purge.me", b"1"); await kv.purge("purge.me")
    await asyncio.sleep(0.5)
    for k in ["del.me", "purge.me"]:
        try: e = await skv.get(k); print(k, "on mirror ->", e)
        except Exception as ex: print(k, "on mirror ->", type(ex).__name__)
asyncio.run(main())
