import asyncio, time
from lib import *
async def lat(f, n=200):
    xs = []
    for i in range(n):
        t = time.perf_counter(); await f(); xs.append((time.perf_counter()-t)*1000)
    xs.sort(); return f"p50 {xs[n//2]:.2f} p99 {xs[int(n*.99)]:.2f} ms"
async def main():
    sa = await connect(SA)
    local = await sa.jetstream().key_value("mf_registry"); hubkv = await sa.jetstream(domain="hub").key_value("mf_registry")
    for d in [0, 10]:
        ctl("a", f"delay {d}")
        print(f"one-way delay {d} ms: KV get on site mirror {await lat(lambda: local.get('deploy.3'))}; KV get on hub bucket via $JS.hub.API {await lat(lambda: hubkv.get('deploy.3'))}")
    ctl("a", "delay 0")
asyncio.run(main())
