import asyncio, time, sys, json, uuid, os
from lib import *
SITE = "site-b"; SURL = SB; PX = "b"
SITE_STREAM = f"mf_usage_{SITE}"
SITE_SUBJ = f"mf.site.{SITE}.usage"
CONS = "to-hub"; DELIVER = f"mf.sync.{SITE}.usage"

async def info(nc, pre, name):
    ms, r = await api(nc, pre, f"STREAM.INFO.{name}", timeout=2)
    return r

async def setup(hub, sb, durable, retention):
    await api(hub, "$JS.API", "STREAM.DELETE.mf_usage"); await api(sb, "$JS.API", f"STREAM.DELETE.{SITE_STREAM}")
    site_cfg = {"name": SITE_STREAM, "subjects": [f"{SITE_SUBJ}.>"], "retention": retention, "storage": "file",
                "duplicate_window": 120_000_000_000, "num_replicas": 1}
    r = (await api(sb, "$JS.API", f"STREAM.CREATE.{SITE_STREAM}", site_cfg))[1]; assert "error" not in r, r
    src = {"name": SITE_STREAM, "external": {"api": f"$JS.{SITE}.API", "deliver": ""},
           "subject_transforms": [{"src": f"{SITE_SUBJ}.>", "dest": "mf.usage.>"}]}
    if durable:
        cc = {"stream_name": SITE_STREAM, "config": {"durable_name": CONS, "name": CONS, "deliver_subject": DELIVER,
              "ack_policy": "flow_control", "flow_control": True, "idle_heartbeat": 1_000_000_000, "max_ack_pending": 10000, "deliver_policy": "all"}}
        r = (await api(sb, "$JS.API", f"CONSUMER.CREATE.{SITE_STREAM}.{CONS}", cc))[1]; assert "error" not in r, r
        src["consumer"] = {"name": CONS, "deliver_subject": DELIVER}
    import os
    hub_cfg = {"name": "mf_usage", "subjects": ["mf.usage.>"], "retention": "limits", "storage": "file",
               "duplicate_window": int(float(os.environ.get("HUBDUP", "120")) * 1e9), "num_replicas": 1, "sources": [src]}
    r = (await api(hub, "$JS.API", "STREAM.CREATE.mf_usage", hub_cfg))[1]; assert "error" not in r, r
    return hub_cfg

async def publish_n(nc, n, tag, prefix=SITE_SUBJ):
    js = nc.jetstream()
    t = time.perf_counter()
    for start in range(0, n, 1000):
        futs = [js.publish(f"{prefix}.f{i%7}", json.dumps({"rid": f"{tag}-{i}"}).encode(), headers={"Nats-Msg-Id": f"node1.f{i%7}.{tag}-{i}"}) for i in range(start, min(n, start + 1000))]
        await asyncio.gather(*futs)
    return time.perf_counter() - t

async def wait_hub(hub, target, timeout=300):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        r = await info(hub, "$JS.API", "mf_usage")
        if not isinstance(r, Exception) and r["state"]["messages"] >= target: return time.monotonic() - t, r
        await asyncio.sleep(0.01)
    return None, r

async def count_unique(hub, n_expected):
    # read every message of the hub stream and count unique msg ids
    js = hub.jetstream()
    sub = await js.subscribe("mf.usage.>", stream="mf_usage", ordered_consumer=True)
    ids = {}; total = 0
    r = await info(hub, "$JS.API", "mf_usage"); n = r["state"]["messages"]
    while total < n:
        m = await sub.next_msg(timeout=5)
        total += 1; i = m.headers.get("Nats-Msg-Id"); ids[i] = ids.get(i, 0) + 1
    await sub.unsubscribe()
    return total, len(ids), sum(1 for v in ids.values() if v > 1)

async def main():
    mode = sys.argv[1]
    hub = await connect(HUB); sb = await connect(SURL)
    if mode == "collide":
        # same subjects at site and hub: does a site publish land in both?
        await api(hub, "$JS.API", "STREAM.DELETE.COL"); await api(sb, "$JS.API", "STREAM.DELETE.COL_SITE")
        print((await api(hub, "$JS.API", "STREAM.CREATE.COL", {"name": "COL", "subjects": ["col.>"]}))[1].get("error", "hub ok"))
        print((await api(sb, "$JS.API", "STREAM.CREATE.COL_SITE", {"name": "COL_SITE", "subjects": ["col.>"]}))[1].get("error", "site ok"))
        for i in range(5):
            m = await sb.request("col.x", b"x", timeout=2); print("ack:", m.data)
        await asyncio.sleep(0.2)
        print("hub COL msgs", (await info(hub, "$JS.API", "COL"))["state"]["messages"], "site COL_SITE msgs", (await info(sb, "$JS.API", "COL_SITE"))["state"]["messages"])
        await api(hub, "$JS.API", "STREAM.DELETE.COL"); await api(sb, "$JS.API", "STREAM.DELETE.COL_SITE")
        return
    durable = mode in ("durable", "durable-wq"); retention = "workqueue" if mode == "durable-wq" else "limits"
    await setup(hub, sb, durable, retention)
    N = int(sys.argv[2]); runs = int(sys.argv[3]); flaps = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    # connected sanity + latency site publish -> visible at hub
    d = await publish_n(sb, 1, "warm"); w, _ = await wait_hub(hub, 1); print(f"[{mode}] connected: 1 record at hub {w*1000:.0f} ms after site ack")
    total_expected = 1
    for run in range(runs):
        tag = uuid.uuid4().hex[:6]
        ctl(PX, "cut"); await wait_noleaf(SITE)
        d = await publish_n(sb, N, tag); total_expected += N
        si = await info(sb, "$JS.API", SITE_STREAM)
        print(f"  run {run}: {N} appends at the cut site in {d:.2f}s ({N/d:.0f}/s); site stream msgs {si['state']['messages']}")
        await asyncio.sleep(float(sys.argv[5]) if len(sys.argv) > 5 else 2)
        ctl(PX, "heal"); t0 = time.monotonic()
        dl = await wait_leaf(SITE, 1)
        for f in range(flaps):
            await asyncio.sleep(float(os.environ.get("FLAPGAP", "0.3")))
            r0 = await info(hub, "$JS.API", "mf_usage"); print("    flap at hub msgs", r0["state"]["messages"])
            ctl(PX, "cut"); await wait_noleaf(SITE); await asyncio.sleep(1); ctl(PX, "heal"); await wait_leaf(SITE, 1)
        w, r = await wait_hub(hub, total_expected)
        hi = r["sources"][0] if "sources" in r else {}
        print(f"  run {run}: heal->leaf {dl:.2f}s; all {total_expected} at hub {time.monotonic()-t0:.2f}s after heal (flaps {flaps}); hub msgs {r['state']['messages']}; source lag {hi.get('lag')} err {hi.get('error')}")
    await asyncio.sleep(2)
    total, uniq, dups = await count_unique(hub, total_expected)
    si = await info(sb, "$JS.API", SITE_STREAM)
    print(f"[{mode}] hub stream: {total} msgs, {uniq} unique msg ids, {dups} duplicated ids; expected {total_expected}; site stream left {si['state']['messages']}")
    # dedup across sourcing: same msg id published directly at hub within window
    m = await hub.request("mf.usage.f0", b"again", headers={"Nats-Msg-Id": f"node1.f0.{tag}-0"}, timeout=2)
    print("  direct hub publish with a msg id already sourced:", m.data)
    m = await sb.request(f"{SITE_SUBJ}.f0", b"again", headers={"Nats-Msg-Id": f"node1.f0.{tag}-0"}, timeout=2)
    print("  re-publish at site with the same id:", m.data)

if __name__ == "__main__":
    asyncio.run(main())
