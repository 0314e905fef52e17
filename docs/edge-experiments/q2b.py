import asyncio, time, json
from lib import *
async def tryreq(nc, subj, data=b"x"):
    t = time.perf_counter()
    try:
        r = await nc.request(subj, data, timeout=2); return f"{r.data} {(time.perf_counter()-t)*1000:.1f}ms"
    except Exception as e: return f"{type(e).__name__} {(time.perf_counter()-t)*1000:.1f}ms"
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    for name, subj in [("S_KVOTHER", "$KV.other.>"), ("S_PLAIN", "plain.>"), ("S_DOLLAR", "$MF.x.>")]:
        await api(hub, "$JS.API", f"STREAM.DELETE.{name}")
        ms, r = await api(hub, "$JS.API", f"STREAM.CREATE.{name}", {"name": name, "subjects": [subj], "storage": "memory"}); print(name, r.get("error") or "ok")
    for s in ["$KV.other.k", "plain.k", "$MF.x.k", "$KV.mf_registry.k", "$JS.hub.API.$KV.mf_registry.k"]:
        print(f"site-a request {s}:", await tryreq(sa, s))
    print("hub subz:", [ (x.get("subject")) for x in mon("hub","subsz?subs=1").get("subscriptions_list",[]) if "KV" in x.get("subject","") or "plain" in x.get("subject","")][:20])
    print("site subz:", [ (x.get("subject")) for x in mon("site-a","subsz?subs=1").get("subscriptions_list",[]) if "KV" in x.get("subject","") or "plain" in x.get("subject","")][:20])
asyncio.run(main())
