import asyncio, time, sys, json
from lib import *
async def responder(url, name, subject, queue="fwd"):
    nc = await connect(url, name)
    async def cb(m):
        await m.respond(name.encode() + b":" + str(len(m.data)).encode())
    await nc.subscribe(subject, queue=queue, cb=cb)
    await nc.flush()
    return nc
async def lat(nc, subject, n=300, size=1024):
    body = b"x" * size; xs = []; who = {}
    for i in range(n):
        t = time.perf_counter(); r = await nc.request(subject, body, timeout=5); xs.append((time.perf_counter() - t) * 1000)
        w = r.data.split(b":")[0].decode(); who[w] = who.get(w, 0) + 1
    xs.sort(); return f"p50 {xs[n//2]:.2f} p90 {xs[int(n*.9)]:.2f} p99 {xs[int(n*.99)]:.2f} ms, served by {who}"
async def main():
    ra = await responder(SA, "node-a", "mf.fwd.pinned")        # function pinned to site a
    rh = await responder(HUB, "node-hub", "mf.fwd.everywhere")  # function running at hub and site a
    ra2 = await responder(SA, "node-a", "mf.fwd.everywhere")
    rb_local = await responder(SB, "node-b", "mf.fwd.bonly")
    await asyncio.sleep(0.5)
    ca = await connect(SA); cb_ = await connect(SB); ch = await connect(HUB)
    for d in [int(x) for x in sys.argv[1:]] or [0]:
        ctl("a", f"delay {d}"); ctl("b", f"delay {d}")
        print(f"--- one-way delay per leaf link {d} ms (site->hub RTT {2*d} ms, site->site {4*d} ms)")
        print("site-b -> node at site-b (local)        :", await lat(cb_, "mf.fwd.bonly"))
        print("site-a -> node at site-a (local)        :", await lat(ca, "mf.fwd.pinned"))
        print("hub    -> node at site-a (1 leaf hop)   :", await lat(ch, "mf.fwd.pinned"))
        print("site-b -> node at site-a (via hub)      :", await lat(cb_, "mf.fwd.pinned"))
        print("site-b -> queue {hub, site-a}           :", await lat(cb_, "mf.fwd.everywhere"))
        print("site-a -> queue {hub, site-a}           :", await lat(ca, "mf.fwd.everywhere"))
        print("site-b -> pinned, 512 KiB body          :", await lat(cb_, "mf.fwd.pinned", 50, 512*1024))
    ctl("a", "delay 0"); ctl("b", "delay 0")
if __name__ == "__main__":
    asyncio.run(main())
