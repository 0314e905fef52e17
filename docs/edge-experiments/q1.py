import asyncio, time, json
from lib import *

async def main():
    nc = await connect(SA, "q1")
    print("connected to", nc.connected_server_version, nc._server_info.get("server_name"), "domain", nc._server_info.get("domain"))
    for pre in ["$JS.API", "$JS.site-a.API", "$JS.hub.API", "$JS.site-b.API"]:
        ms, r = await api(nc, pre, "INFO")
        print(pre, f"{ms:.1f} ms", r if isinstance(r, Exception) else {k: r.get(k) for k in ("domain", "streams", "type")})
    # create a stream on the hub from site a
    ms, r = await api(nc, "$JS.hub.API", "STREAM.CREATE.Q1", {"name": "Q1", "subjects": ["q1.>"], "storage": "file", "num_replicas": 1})
    print("create on hub via site-a", f"{ms:.1f}ms", r.get("error") or r["config"]["name"])
    # publish q1.x from site a: does it land in hub stream?
    t = time.perf_counter(); ack = await nc.request("q1.x", b"hello", timeout=2); print("publish q1.x from site-a ->", ack.data, f"{(time.perf_counter()-t)*1000:.1f}ms")
    js = nc.jetstream(domain="hub")
    t = time.perf_counter(); a = await js.publish("q1.y", b"x"); print("js(domain=hub).publish", a, f"{(time.perf_counter()-t)*1000:.1f}ms")
    # hub-side latency through site vs direct
    lat = []
    for i in range(200):
        t = time.perf_counter(); await api(nc, "$JS.hub.API", "STREAM.INFO.Q1"); lat.append((time.perf_counter()-t)*1000)
    lat.sort(); print(f"STREAM.INFO via leaf: p50 {lat[100]:.2f} p99 {lat[197]:.2f} ms")
    nh = await connect(HUB, "q1h"); lat=[]
    for i in range(200):
        t = time.perf_counter(); await api(nh, "$JS.API", "STREAM.INFO.Q1"); lat.append((time.perf_counter()-t)*1000)
    lat.sort(); print(f"STREAM.INFO on hub direct: p50 {lat[100]:.2f} p99 {lat[197]:.2f} ms")

    for mode in ["cut", "blackhole"]:
        print("=== link", mode)
        print(ctl("a", mode))
        t0 = time.monotonic()
        for i in range(8):
            ms, r = await api(nc, "$JS.hub.API", "STREAM.INFO.Q1", timeout=2)
            t1 = time.perf_counter()
            try:
                a = await js.publish("q1.z", b"x", timeout=2); pr = a
            except Exception as e:
                pr = repr(e)
            pms = (time.perf_counter()-t1)*1000
            print(f"t+{time.monotonic()-t0:5.2f}s INFO {ms:7.1f}ms {type(r).__name__ if isinstance(r, Exception) else 'ok'} | js.publish {pms:7.1f}ms {pr if isinstance(pr,str) else 'ok'} | hub leafs {leafs('hub')} site-a leafs {leafs('site-a')}")
            # local domain still works?
            await asyncio.sleep(0.3)
        ms, r = await api(nc, "$JS.API", "INFO"); print("local $JS.API INFO", f"{ms:.1f}ms", r if isinstance(r, Exception) else r.get("domain"))
        if mode == "blackhole":
            d = await wait_noleaf("site-a", 400); print(f"blackhole: site-a noticed leaf loss after further {d:.1f}s")
        print(ctl("a", "heal")); t = time.monotonic()
        d = await wait_leaf("hub", 2); print(f"healed: hub sees 2 leafs after {d:.2f}s")
        # time until the hub API answers from site a
        t = time.monotonic()
        while True:
            ms, r = await api(nc, "$JS.hub.API", "STREAM.INFO.Q1", timeout=0.5)
            if not isinstance(r, Exception): break
            await asyncio.sleep(0.01)
        print(f"hub API answers again {time.monotonic()-t:.2f}s after leaf count back")
    await nc.close(); await nh.close()

asyncio.run(main())
