import asyncio, time, json
from lib import *
async def probe(nc):
    t = time.perf_counter()
    try:
        await nc.request("$JS.hub.API.INFO", b"", timeout=1); return True, (time.perf_counter()-t)*1000
    except Exception as e: return type(e).__name__, (time.perf_counter()-t)*1000
async def main():
    sa = await connect(SA); hub = await connect(HUB)
    print("site-a /leafz connected:", json.dumps(mon("site-a", "leafz"), indent=None)[:900])
    v = mon("site-a", "varz"); print("site-a /varz leaf section:", json.dumps(v.get("leaf")), "| domain", v.get("jetstream", {}).get("config", {}).get("domain"))
    print("hub /leafz names:", [(l["name"], l.get("rtt")) for l in mon("hub", "leafz")["leafs"]])
    ctl("a", "cut"); t0 = time.monotonic()
    seen = None
    while seen is None:
        ok, ms = await probe(sa)
        if ok is not True: seen = time.monotonic() - t0
        await asyncio.sleep(0.05)
    print(f"cut (FIN): hub probe fails after {seen*1000:.0f} ms ({ok}, {ms:.1f} ms); site-a /leafz leafnodes={leafs('site-a')}")
    print("site-a /leafz while cut:", json.dumps(mon("site-a", "leafz")))
    await asyncio.sleep(3)
    r = (await api(sa, "$JS.API", "STREAM.INFO.KV_mf_registry"))[1]; print("site mirror info while cut:", json.dumps(r.get("mirror")))
    r = (await api(hub, "$JS.API", "STREAM.INFO.mf_usage"))[1]; print("hub mf_usage sources while site-b connected:", json.dumps(r.get("sources"))[:400])
    ctl("a", "heal"); t0 = time.monotonic()
    while True:
        ok, ms = await probe(sa)
        if ok is True: break
        await asyncio.sleep(0.05)
    print(f"heal: hub probe ok after {(time.monotonic()-t0)*1000:.0f} ms; leafz {leafs('site-a')}")
    # What hub-side sees for a cut site-b usage source
    ctl("b", "cut"); await wait_noleaf("site-b"); await asyncio.sleep(12)
    r = (await api(hub, "$JS.API", "STREAM.INFO.mf_usage"))[1]; print("hub mf_usage sources 12 s into site-b cut:", json.dumps(r.get("sources"))[:500])
    r = (await api(await connect(SB), "$JS.API", "CONSUMER.INFO.mf_usage_site-b.to-hub"))[1]; print("site-b to-hub consumer while cut:", {k: r.get(k) for k in ("num_pending", "num_ack_pending", "delivered", "ack_floor")})
    ctl("b", "heal"); await wait_leaf("site-b", 1)
asyncio.run(main())
