import asyncio, time, json, uuid, sys
from lib import *
import nats.js.api as api_

KV_HUB = {"name": "KV_mf_registry", "subjects": ["$KV.mf_registry.>"], "max_msgs_per_subject": 1,
          "allow_rollup_hdrs": True, "deny_delete": True, "allow_direct": True, "discard": "new",
          "storage": "file", "num_replicas": 1, "allow_atomic": True}
KV_MIRROR = {"name": "KV_mf_registry", "max_msgs_per_subject": 1, "allow_rollup_hdrs": True, "deny_delete": True,
             "allow_direct": True, "mirror_direct": True, "discard": "new", "storage": "file", "num_replicas": 1,
             "mirror": {"name": "KV_mf_registry", "external": {"api": "$JS.hub.API"}}}

async def last_seq(nc, pre="$JS.API"):
    ms, r = await api(nc, pre, "STREAM.INFO.KV_mf_registry", timeout=1)
    if isinstance(r, Exception) or "error" in r: return None, r
    return r["state"]["last_seq"], r

async def wait_seq(nc, target, timeout=120):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        s, _ = await last_seq(nc)
        if s is not None and s >= target: return time.monotonic() - t
        await asyncio.sleep(0.005)
    return None

async def batch(nc, prefix, writes):
    """Mayfly-style atomic batch: writes = [(key, value, expect)]"""
    bid = uuid.uuid4().hex[:16]
    for i, (k, v, exp) in enumerate(writes, 1):
        h = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(i)}
        if exp is not None: h["Nats-Expected-Last-Subject-Sequence"] = str(exp)
        if i == len(writes):
            h["Nats-Batch-Commit"] = "1"
            try:
                m = await nc.request(prefix + k, v, headers=h, timeout=2)
                return json.loads(m.data)
            except Exception as e:
                return e
        await nc.publish(prefix + k, v, headers=h)

async def main():
    hub = await connect(HUB, "hub-admin"); sa = await connect(SA, "node-a")
    await api(hub, "$JS.API", "STREAM.DELETE.KV_mf_registry"); await api(sa, "$JS.API", "STREAM.DELETE.KV_mf_registry")
    ms, r = await api(hub, "$JS.API", "STREAM.CREATE.KV_mf_registry", KV_HUB); print("hub bucket:", r.get("error") or "ok", "allow_atomic", r.get("config", {}).get("allow_atomic"))
    hj = hub.jetstream()
    kvh = await hj.key_value("mf_registry")
    for i in range(5): await kvh.put(f"fn.f{i}", b"v1")
    ms, r = await api(sa, "$JS.API", "STREAM.CREATE.KV_mf_registry", KV_MIRROR); print("site-a mirror:", r.get("error") or "ok")
    hs, _ = await last_seq(hub); d = await wait_seq(sa, hs); print(f"mirror initial sync of {hs} msgs: {d:.3f}s")
    # sequences preserved?
    ms, r = await api(sa, "$JS.API", "DIRECT.GET.KV_mf_registry", {"last_by_subj": "$KV.mf_registry.fn.f3"})
    print("direct get on site mirror (nats-py raw request returns headers only; use js):")
    sj = sa.jetstream()
    m = await sj.get_last_msg("KV_mf_registry", "$KV.mf_registry.fn.f3", direct=True); print("  site mirror seq of fn.f3:", m.seq, "hub:", (await hj.get_last_msg("KV_mf_registry", "$KV.mf_registry.fn.f3")).seq)
    # nats-py KV on the mirror: what put subject?
    kvs = await sj.key_value("mf_registry")
    e = await kvs.get("fn.f3"); print("  nats-py kv.get on mirror:", e.value, e.revision)
    # Writes from site client while connected
    try:
        t = time.perf_counter(); r = await sa.request("$KV.mf_registry.fn.site1", b"x", timeout=2); print(f"core request $KV.mf_registry.fn.site1 from site: {r.data} {(time.perf_counter()-t)*1000:.1f}ms")
    except Exception as ex: print("core request $KV.mf_registry.fn.site1 from site:", type(ex).__name__)
    t = time.perf_counter()
    try:
        r = await sa.request("$JS.hub.API.$KV.mf_registry.fn.site2", b"x", timeout=2); print(f"request $JS.hub.API.$KV.mf_registry.fn.site2 (async-nats put_prefix on a mirror): {r.data} {(time.perf_counter()-t)*1000:.1f}ms")
    except Exception as ex: print("request $JS.hub.API.$KV... ->", repr(ex))
    hs, _ = await last_seq(hub)
    r = await batch(sa, "$JS.hub.API.$KV.mf_registry.", [("fn.b1", b"1", 0), ("ver.b1.1", b"1", 0), ("alias.b1.live", b"1", 0)]); print("atomic batch from site client ->", r)
    hs2, _ = await last_seq(hub); d = await wait_seq(sa, hs2); print(f"mirror got batch in {d*1000:.1f}ms; hub last {hs2}")
    m = await sj.get_last_msg("KV_mf_registry", "$KV.mf_registry.alias.b1.live", direct=True); print("  mirrored batch msg headers:", m.headers)
    # Watch on the mirror: latency from hub put to site watch delivery
    got = {}
    async def cb(msg):
        got[msg.subject] = time.perf_counter()
    sub = await sj.subscribe("$KV.mf_registry.>", stream="KV_mf_registry", ordered_consumer=True, deliver_policy=api_.DeliverPolicy.NEW, cb=cb)
    await asyncio.sleep(0.3)
    lat = []
    for i in range(50):
        t = time.perf_counter(); await kvh.put(f"lat.k{i}", b"x")
        while f"$KV.mf_registry.lat.k{i}" not in got: await asyncio.sleep(0.0005)
        lat.append((got[f"$KV.mf_registry.lat.k{i}"] - t) * 1000)
    lat.sort(); print(f"hub put -> site mirror watch (connected): p50 {lat[25]:.1f} ms, max {lat[-1]:.1f} ms")

    # ---- cut: reads, writes, then catch up
    for run in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        N = [1, 100, 1000][run % 3]
        print(f"=== cut run {run}, {N} hub writes during the cut")
        ctl("a", "cut"); await wait_noleaf("site-a"); await asyncio.sleep(0.5)
        e = await kvs.get("fn.f3"); print("  read on site mirror while cut:", e.value, "rev", e.revision)
        t = time.perf_counter()
        try:
            await sa.request("$JS.hub.API.$KV.mf_registry.fn.cutwrite", b"x", timeout=2); print("  write from site while cut: succeeded?!")
        except Exception as ex: print(f"  write from site while cut: {type(ex).__name__} in {(time.perf_counter()-t)*1000:.1f}ms")
        r = await batch(sa, "$JS.hub.API.$KV.mf_registry.", [("fn.c1", b"1", None), ("fn.c2", b"1", None)]); print("  batch from site while cut:", type(r).__name__)
        for i in range(N): await kvh.put(f"cut{run}.k{i}", b"x" * 200)
        hs, _ = await last_seq(hub); key = f"$KV.mf_registry.cut{run}.k{N-1}"
        await asyncio.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 3)
        ctl("a", "heal"); t0 = time.monotonic(); tp0 = time.perf_counter()
        dl = await wait_leaf("site-a", 1)
        d = await wait_seq(sa, hs)
        while key not in got and time.perf_counter() - tp0 < 60: await asyncio.sleep(0.002)
        w = got.get(key, float("nan")) - tp0
        print(f"  heal -> leaf up {dl:.2f}s; mirror caught up (last_seq {hs}) {d:.2f}s after leaf up ({dl+d:.2f}s after heal); watch saw last key {w:.2f}s after heal")
    await sub.unsubscribe()
    _, info = await last_seq(sa); print("mirror info:", json.dumps(info.get("mirror"))[:400])

if __name__ == "__main__":
    asyncio.run(main())
