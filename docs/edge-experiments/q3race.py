import asyncio, json, copy
from lib import *
async def main():
    hub = await connect(HUB); sa = await connect(SA); sb = await connect(SB)
    for nc, site in ((sa, "site-a"), (sb, "site-b")):
        await api(nc, "$JS.API", f"STREAM.DELETE.R_{site}")
        await api(nc, "$JS.API", f"STREAM.CREATE.R_{site}", {"name": f"R_{site}", "subjects": [f"r.{site}.>"]})
    await api(hub, "$JS.API", "STREAM.DELETE.R_HUB"); await api(hub, "$JS.API", "STREAM.CREATE.R_HUB", {"name": "R_HUB", "subjects": ["r.hub.>"]})
    async def join(nc, site):
        cfg = (await api(nc, "$JS.hub.API", "STREAM.INFO.R_HUB"))[1]["config"]
        cfg = copy.deepcopy(cfg); cfg.setdefault("sources", []).append({"name": f"R_{site}", "external": {"api": f"$JS.{site}.API"}})
        return (await api(nc, "$JS.hub.API", "STREAM.UPDATE.R_HUB", cfg))[1].get("error", "ok")
    print("concurrent joins:", await asyncio.gather(join(sa, "site-a"), join(sb, "site-b")))
    cfg = (await api(hub, "$JS.API", "STREAM.INFO.R_HUB"))[1]["config"]; print("hub sources after:", [s["name"] for s in cfg.get("sources", [])])
    for nc, site in ((sa, "site-a"), (sb, "site-b")): await api(nc, "$JS.API", f"STREAM.DELETE.R_{site}")
    await api(hub, "$JS.API", "STREAM.DELETE.R_HUB")
asyncio.run(main())
