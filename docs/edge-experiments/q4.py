import asyncio, time, json
from lib import *
from q2 import batch
EV = {"name": "KV_mf_events", "subjects": ["$KV.mf_events.>"], "max_msgs_per_subject": 1, "allow_rollup_hdrs": True,
      "deny_delete": False, "allow_direct": True, "discard": "new", "storage": "file", "num_replicas": 1, "allow_atomic": True}
async def tryreq(nc, subj, data=b"x", headers=None):
    t = time.perf_counter()
    try:
        r = await nc.request(subj, data, timeout=2, headers=headers); return f"{r.data.decode()} {(time.perf_counter()-t)*1000:.1f}ms"
    except Exception as e: return f"{type(e).__name__} {(time.perf_counter()-t)*1000:.1f}ms"
async def main():
    hub = await connect(HUB); sa = await connect(SA)
    for nc in (hub, sa): await api(nc, "$JS.API", "STREAM.DELETE.KV_mf_events")
    print("hub events bucket:", (await api(hub, "$JS.API", "STREAM.CREATE.KV_mf_events", EV))[1].get("error", "ok"))
    print("site-a events bucket (same name, own domain):", (await api(sa, "$JS.API", "STREAM.CREATE.KV_mf_events", EV))[1].get("error", "ok"))
    print("site put $KV.mf_events.m.q1.1 (connected):", await tryreq(sa, "$KV.mf_events.m.q1.00000001", b"msg1", {"Nats-Expected-Last-Subject-Sequence": "0"}))
    print("hub put $KV.mf_events.x (connected):", await tryreq(hub, "$KV.mf_events.x"))
    hi = (await api(hub, "$JS.API", "STREAM.INFO.KV_mf_events"))[1]["state"]["messages"]; si = (await api(sa, "$JS.API", "STREAM.INFO.KV_mf_events"))[1]["state"]["messages"]
    print(f"  -> hub bucket msgs {hi}, site bucket msgs {si} (no leak either way)")
    print("hub client writes site queue via $JS.site-a.API.$KV.mf_events...:", await tryreq(hub, "$JS.site-a.API.$KV.mf_events.m.q1.00000002", b"msg2", {"Nats-Expected-Last-Subject-Sequence": "0"}))
    ctl("a", "cut"); await wait_noleaf("site-a")
    print("CUT")
    r = await batch(sa, "$KV.mf_events.", [("ctr", b"3", None), ("m.q1.00000003", b"msg3", 0)]); print("  site atomic batch (counter + message) while cut:", r)
    print("  site CAS update of the claimed record while cut:", await tryreq(sa, "$KV.mf_events.m.q1.00000001", b"claimed", {"Nats-Expected-Last-Subject-Sequence": "1"}))
    print("  hub client writes site queue while cut:", await tryreq(hub, "$JS.site-a.API.$KV.mf_events.m.q1.00000004", b"msg4"))
    print("  site client writes hub queue while cut:", await tryreq(sa, "$JS.hub.API.$KV.mf_events.m.q9.00000001", b"x"))
    # an ordered consumer (claim listing) on the site bucket works while cut
    js = sa.jetstream(); sub = await js.subscribe("$KV.mf_events.m.>", stream="KV_mf_events", ordered_consumer=True, deliver_policy=__import__("nats").js.api.DeliverPolicy.LAST_PER_SUBJECT)
    got = []
    try:
        while True: m = await sub.next_msg(timeout=0.5); got.append((m.subject, m.data))
    except Exception: pass
    print("  listing on the site bucket while cut:", got)
    ctl("a", "heal"); await wait_leaf("site-a", 1)
asyncio.run(main())
