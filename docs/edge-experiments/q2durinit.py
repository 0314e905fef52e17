import asyncio, time, json, sys
from lib import *
def kvcfg(name): return {"name": name, "subjects": [f"$KV.{name[3:]}.>"], "max_msgs_per_subject": 1, "allow_rollup_hdrs": True, "deny_delete": True, "allow_direct": True, "discard": "new", "storage": "file"}
async def trial(hub, sa, name, order, n=1000):
    await api(hub, "$JS.API", f"STREAM.DELETE.{name}"); await api(sa, "$JS.API", f"STREAM.DELETE.{name}")
    r = (await api(hub, "$JS.API", f"STREAM.CREATE.{name}", kvcfg(name)))[1]; assert "error" not in r, r
    js = hub.jetstream()
    await asyncio.gather(*[js.publish(f"$KV.{name[3:]}.k{i}", b"v") for i in range(n)])
    cons = f"sync-{name}"; deliver = f"mf.sync.site-a.{name}"
    cc = {"stream_name": name, "config": {"durable_name": cons, "name": cons, "deliver_subject": deliver, "ack_policy": "flow_control", "flow_control": True,
          "idle_heartbeat": 1_000_000_000, "max_ack_pending": 1000, "deliver_policy": "all"}}
    mcfg = {"name": name, "max_msgs_per_subject": 1, "allow_rollup_hdrs": True, "deny_delete": True, "allow_direct": True, "mirror_direct": True, "discard": "new",
            "mirror": {"name": name, "external": {"api": "$JS.hub.API"}, "consumer": {"name": cons, "deliver_subject": deliver}}}
    steps = [("consumer", lambda: api(sa, "$JS.hub.API", f"CONSUMER.CREATE.{name}.{cons}", cc)), ("mirror", lambda: api(sa, "$JS.API", f"STREAM.CREATE.{name}", mcfg))]
    if order == "mirror-first": steps.reverse()
    for label, f in steps:
        r = (await f())[1]; print(f"   {label}: {r.get('error') or 'ok'}")
        await asyncio.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    t = time.monotonic()
    while time.monotonic() - t < 20:
        s = (await api(sa, "$JS.API", f"STREAM.INFO.{name}"))[1]
        if s["state"]["last_seq"] >= n: break
        await asyncio.sleep(0.05)
    print(f"[{order}] hub {n} msgs -> mirror msgs {s['state']['messages']} first_seq {s['state']['first_seq']} last_seq {s['state']['last_seq']} after {time.monotonic()-t:.2f}s; mirror err {s['mirror'].get('error')}")
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    await trial(hub, sa, "KV_t1", "consumer-first")
    await trial(hub, sa, "KV_t2", "mirror-first")
asyncio.run(main())
