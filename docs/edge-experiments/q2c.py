import asyncio, time, json
from lib import *
from q2 import batch
async def tryreq(nc, subj, data=b"x", headers=None):
    t = time.perf_counter()
    try:
        r = await nc.request(subj, data, timeout=2, headers=headers); return f"{r.data} {(time.perf_counter()-t)*1000:.1f}ms"
    except Exception as e: return f"{type(e).__name__} {(time.perf_counter()-t)*1000:.1f}ms"
async def main():
    hub = await connect(HUB); sa = await connect(SA); hj = hub.jetstream()
    print(await tryreq(sa, "$JS.hub.API.$KV.mf_registry.fn.dom"))
    m = await hj.get_last_msg("KV_mf_registry", "$KV.mf_registry.fn.dom"); print("stored subject:", m.subject, m.seq)
    kv = await hj.key_value("mf_registry"); e = await kv.get("fn.dom"); rev = e.revision
    print("CAS via domain prefix, right rev:", await tryreq(sa, "$JS.hub.API.$KV.mf_registry.fn.dom", b"y", {"Nats-Expected-Last-Subject-Sequence": str(rev)}))
    print("CAS via domain prefix, stale rev:", await tryreq(sa, "$JS.hub.API.$KV.mf_registry.fn.dom", b"z", {"Nats-Expected-Last-Subject-Sequence": str(rev)}))
    r = await batch(sa, "$JS.hub.API.$KV.mf_registry.", [("fn.b2", b"1", 0), ("ver.b2.1", b"1", 0), ("alias.b2.live", b"1", 0)]); print("atomic batch via $JS.hub.API.$KV prefix ->", r)
    r = await batch(sa, "$JS.hub.API.$KV.mf_registry.", [("fn.b3", b"1", 0), ("ver.b2.1", b"1", 0)]); print("atomic batch with a stale expectation ->", r)
    # object store subjects
    await api(hub, "$JS.API", "STREAM.DELETE.OBJ_mf_blobs")
    ob = await hj.create_object_store("mf_blobs"); await ob.put("component/abc", b"A" * 300000)
    print("hub object put ok")
    sj = sa.jetstream(domain="hub")
    t = time.perf_counter(); o = await (await sj.object_store("mf_blobs")).get("component/abc"); print(f"site reads hub object via domain hub: {len(o.data)} bytes {(time.perf_counter()-t)*1000:.1f}ms")
    print("site core publish $O.mf_blobs.C.x:", await tryreq(sa, "$O.mf_blobs.C.x"))
    print("site publish $JS.hub.API.$O.mf_blobs.C.x:", await tryreq(sa, "$JS.hub.API.$O.mf_blobs.C.x"))
    try:
        t = time.perf_counter(); await (await sj.object_store("mf_blobs")).put("component/fromsite", b"B" * 1000); print(f"nats-py object put from site via domain: ok {(time.perf_counter()-t)*1000:.1f}ms")
    except Exception as e: print("nats-py object put from site via domain:", repr(e))
asyncio.run(main())
