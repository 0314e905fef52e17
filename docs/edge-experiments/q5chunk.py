import asyncio, time, sys
from lib import *
CH = 256 * 1024
async def main():
    na = await connect(SA, "node-a"); buf = {}
    async def chunk_cb(m):
        rid = m.headers["Mayfly-Req"]; buf.setdefault(rid, []).append(len(m.data))
        await m.respond(b"ok")
    await na.subscribe("mf.fwd.node-a.body", cb=chunk_cb); await na.flush()
    nb = await connect(SB); await asyncio.sleep(0.3)
    for d in [0, 10]:
        ctl("a", f"delay {d}"); ctl("b", f"delay {d}")
        for window in [1, 4, 16]:
            size = 16 * 1024 * 1024; body = b"y" * size; rid = f"r{d}{window}"
            t = time.perf_counter(); sem = asyncio.Semaphore(window)
            async def send(i):
                async with sem:
                    await nb.request("mf.fwd.node-a.body", body[i:i+CH], headers={"Mayfly-Req": rid, "Mayfly-Off": str(i)}, timeout=10)
            await asyncio.gather(*[send(i) for i in range(0, size, CH)])
            el = time.perf_counter() - t
            print(f"one-way delay {d} ms: 16 MiB in {CH//1024} KiB chunks, window {window}: {el*1000:.0f} ms ({size/el/1e6:.0f} MB/s); received {sum(buf[rid])}")
    ctl("a", "delay 0"); ctl("b", "delay 0")
asyncio.run(main())
