import asyncio, time, subprocess, urllib.request
from lib import *
async def info(nc, n):
    s = (await api(nc, "$JS.API", f"STREAM.INFO.{n}"))[1]; return (s["state"]["messages"], s["state"]["first_seq"], s["state"]["last_seq"]) if "state" in s else s
async def main():
    sa = await connect(SA)
    print("before kill:", "KV_t1", await info(sa, "KV_t1"), "KV_t2", await info(sa, "KV_t2"), "KV_mf_registry", await info(sa, "KV_mf_registry"))
    await sa.close()
    subprocess.run(["./run.sh", "kill9", "site-a"]); await asyncio.sleep(0.3); subprocess.run(["./run.sh", "start", "site-a"])
    while True:
        try:
            if urllib.request.urlopen("http://127.0.0.1:28301/healthz", timeout=1).status == 200: break
        except Exception: await asyncio.sleep(0.05)
    sa = await connect(SA)
    print("after kill -9 + restart:", "KV_t1", await info(sa, "KV_t1"), "KV_t2", await info(sa, "KV_t2"), "KV_mf_registry", await info(sa, "KV_mf_registry"))
asyncio.run(main())
