import asyncio, time, sys, json
from lib import *
from q2 import last_seq, wait_seq, KV_HUB, KV_MIRROR
SITE = "site-a"; DELIVER = f"mf.sync.{SITE}.registry"; CONS = f"sync-{SITE}-registry"
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    await api(sa, "$JS.API", "STREAM.DELETE.KV_mf_registry")
    # durable push consumer on the hub, created from the SITE via the hub's domain API (what an edge node would do)
    cc = {"stream_name": "KV_mf_registry", "config": {"durable_name": CONS, "name": CONS, "deliver_subject": DELIVER,
          "ack_policy": "flow_control", "flow_control": True, "idle_heartbeat": 1_000_000_000, "max_ack_pending": 1000,
          "deliver_policy": "all", "description": "mirror of the registry at site-a"}}
    ms, r = await api(sa, "$JS.hub.API", f"CONSUMER.CREATE.KV_mf_registry.{CONS}", cc)
    print("durable consumer on hub:", r if isinstance(r, Exception) else (r.get("error") or "ok"))
    cfg = json.loads(json.dumps(KV_MIRROR)); cfg["mirror"]["consumer"] = {"name": CONS, "deliver_subject": DELIVER}
    ms, r = await api(sa, "$JS.API", "STREAM.CREATE.KV_mf_registry", cfg); print("durable mirror on site:", r.get("error") or "ok")
    hs, _ = await last_seq(hub); d = await wait_seq(sa, hs, 30); print(f"initial sync of {hs}: {d}")
    kvh = await hub.jetstream().key_value("mf_registry")
    for cut in [float(x) for x in sys.argv[1:]]:
        ctl("a", "cut"); await wait_noleaf("site-a"); t = time.monotonic()
        await asyncio.sleep(cut)
        _, info = await last_seq(sa); print("  mirror info while cut:", json.dumps(info["mirror"]))
        for i in range(10): await kvh.put(f"dur.k{i}", b"x")
        hs, _ = await last_seq(hub)
        ctl("a", "heal"); t0 = time.monotonic()
        dl = await wait_leaf("site-a", 1); d = await wait_seq(sa, hs, 300)
        print(f"durable mirror, cut {cut:.0f}s: leaf up {dl:.2f}s after heal, caught up {d:.2f}s after leaf ({time.monotonic()-t0:.2f}s after heal)", flush=True)
asyncio.run(main())
