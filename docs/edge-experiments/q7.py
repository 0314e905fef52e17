import asyncio, time, json, subprocess
from lib import *
from q2 import KV_MIRROR
async def main():
    ctl("a", "cut"); await wait_noleaf("site-a")
    subprocess.run(["./run.sh", "kill9", "site-a"]); await asyncio.sleep(0.5)
    t = time.monotonic(); subprocess.run(["./run.sh", "start", "site-a"])
    while True:
        try:
            if urllib.request.urlopen("http://127.0.0.1:28301/healthz", timeout=1).status == 200: break
        except Exception: await asyncio.sleep(0.05)
    print(f"site-a restarted while its leaf link is cut: healthz 200 after {time.monotonic()-t:.2f}s")
    sa = await connect(SA)
    kv = await sa.jetstream().key_value("mf_registry"); e = await kv.get("fn.f3"); print("registry mirror after a crash + offline restart: fn.f3 =", e.value, "rev", e.revision)
    si = (await api(sa, "$JS.API", "STREAM.INFO.mf_usage_site-a"))[1]; print("site usage stream exists?", si.get("error", "yes"))
    # a new mirror (durable consumer missing on the hub) created while cut
    cfg = json.loads(json.dumps(KV_MIRROR)); cfg["name"] = "KV_mf_triggers"; cfg["mirror"]["name"] = "KV_mf_triggers"
    cfg["mirror"]["consumer"] = {"name": "sync-site-a-triggers", "deliver_subject": "mf.sync.site-a.triggers"}
    await api(sa, "$JS.API", "STREAM.DELETE.KV_mf_triggers")
    ms, r = await api(sa, "$JS.API", "STREAM.CREATE.KV_mf_triggers", cfg); print(f"durable mirror created while cut (consumer not on hub yet): {r.get('error') or 'ok'} {ms:.0f} ms")
    cfg2 = json.loads(json.dumps(cfg)); cfg2["name"] = "KV_mf_triggers2"; del cfg2["mirror"]["consumer"]
    await api(sa, "$JS.API", "STREAM.DELETE.KV_mf_triggers2")
    ms, r = await api(sa, "$JS.API", "STREAM.CREATE.KV_mf_triggers2", cfg2); print(f"ephemeral mirror created while cut: {r.get('error') or 'ok'} {ms:.0f} ms")
    ctl("a", "heal"); await wait_leaf("site-a", 1)
    hub = await connect(HUB)
    await api(hub, "$JS.API", "STREAM.DELETE.KV_mf_triggers")
    ms, r = await api(hub, "$JS.API", "STREAM.CREATE.KV_mf_triggers", {"name": "KV_mf_triggers", "subjects": ["$KV.mf_triggers.>"], "max_msgs_per_subject": 1, "allow_direct": True, "allow_rollup_hdrs": True, "deny_delete": True, "discard": "new"})
    await (await hub.jetstream().key_value("mf_triggers")).put("t.1", b"trigger")
    cc = {"stream_name": "KV_mf_triggers", "config": {"durable_name": "sync-site-a-triggers", "name": "sync-site-a-triggers", "deliver_subject": "mf.sync.site-a.triggers",
          "ack_policy": "flow_control", "flow_control": True, "idle_heartbeat": 1_000_000_000, "max_ack_pending": 1000, "deliver_policy": "all"}}
    t = time.monotonic(); ms, r = await api(sa, "$JS.hub.API", "CONSUMER.CREATE.KV_mf_triggers.sync-site-a-triggers", cc); print("consumer created on hub after heal:", r.get("error") or "ok")
    while True:
        s = (await api(sa, "$JS.API", "STREAM.INFO.KV_mf_triggers"))[1]
        if s["state"]["last_seq"] >= 1 or time.monotonic() - t > 60: break
        await asyncio.sleep(0.05)
    print(f"  mirror picked the new consumer up after {time.monotonic()-t:.2f}s (last_seq {s['state']['last_seq']}, mirror err {s.get('mirror',{}).get('error')})")
asyncio.run(main())
