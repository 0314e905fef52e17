import asyncio, time, json
from lib import *
async def info(nc, n):
    s = (await api(nc, "$JS.API", f"STREAM.INFO.{n}"))[1]; return (s["state"]["messages"], s["state"]["first_seq"], s["state"]["last_seq"])
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    name = "KV_t1"; cons = f"sync-{name}"; deliver = f"mf.sync.site-a.{name}"
    mcfg = {"name": name, "max_msgs_per_subject": 1, "allow_rollup_hdrs": True, "deny_delete": True, "allow_direct": True, "mirror_direct": True, "discard": "new",
            "mirror": {"name": name, "external": {"api": "$JS.hub.API"}, "consumer": {"name": cons, "deliver_subject": deliver}}}
    print("site mirror before:", await info(sa, name), "hub:", await info(hub, name))
    await api(sa, "$JS.API", f"STREAM.DELETE.{name}")
    print("recreate the site mirror (durable consumer kept on the hub):", (await api(sa, "$JS.API", f"STREAM.CREATE.{name}", mcfg))[1].get("error", "ok"))
    await asyncio.sleep(2); print("  site mirror after 2 s:", await info(sa, name))
    await hub.jetstream().publish(f"$KV.t1.new", b"v"); await asyncio.sleep(1); print("  after one more hub write:", await info(sa, name))
    # the fix: delete the durable consumer too and re-create both
    await api(sa, "$JS.API", f"STREAM.DELETE.{name}"); await api(sa, "$JS.hub.API", f"CONSUMER.DELETE.{name}.{cons}")
    cc = {"stream_name": name, "config": {"durable_name": cons, "name": cons, "deliver_subject": deliver, "ack_policy": "flow_control", "flow_control": True,
          "idle_heartbeat": 1_000_000_000, "max_ack_pending": 1000, "deliver_policy": "all"}}
    print("consumer re-created:", (await api(sa, "$JS.hub.API", f"CONSUMER.CREATE.{name}.{cons}", cc))[1].get("error", "ok"))
    print("mirror re-created:", (await api(sa, "$JS.API", f"STREAM.CREATE.{name}", mcfg))[1].get("error", "ok"))
    await asyncio.sleep(2); print("  site mirror after 2 s:", await info(sa, name), "hub:", await info(hub, name))
asyncio.run(main())
