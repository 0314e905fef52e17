#!/usr/bin/env python3
"""A stoppable, delaying TCP proxy for link-cut experiments.

usage: proxy.py LISTEN_PORT TARGET_PORT CONTROL_PORT [DELAY_MS]

Control (one line over TCP to 127.0.0.1:CONTROL_PORT, answered with "ok <state>"):
  cut        close every proxied connection (FIN/RST both ways) and refuse new ones
  blackhole  keep connections open but drop every byte both ways; new ones are accepted and starved
  heal       forward again (new connections only; cut ones stay closed)
  delay N    one-way delay of N ms added to every chunk in both directions (so RTT += 2N)
  state      print the state
"""
import asyncio
import sys
import time

LISTEN, TARGET, CONTROL = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
state = {"mode": "up", "delay": (int(sys.argv[4]) if len(sys.argv) > 4 else 0) / 1000.0}
conns = set()


def log(*a):
    print(time.strftime("%H:%M:%S"), f"{time.time():.3f}", *a, flush=True)


async def pump(reader, writer, pair):
    # Each chunk is delivered at (arrival + delay), in order.
    q = asyncio.Queue()

    async def sender():
        try:
            while True:
                t, data = await q.get()
                if data is None:
                    break
                wait = t + state["delay"] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if state["mode"] == "blackhole":
                    continue
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    task = asyncio.create_task(sender())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if state["mode"] == "blackhole":
                continue
            q.put_nowait((time.monotonic(), data))
    except Exception:
        pass
    q.put_nowait((time.monotonic(), None))
    await task


async def handle(reader, writer):
    if state["mode"] == "cut":
        writer.close()
        return
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", TARGET)
    except Exception as e:
        log("upstream connect failed", e)
        writer.close()
        return
    pair = (writer, uw)
    conns.add(pair)
    log("conn open", len(conns))
    await asyncio.gather(pump(reader, uw, pair), pump(ur, writer, pair))
    conns.discard(pair)
    log("conn closed", len(conns))


async def control(reader, writer):
    line = (await reader.readline()).decode().strip().split()
    cmd = line[0] if line else "state"
    if cmd == "cut":
        state["mode"] = "cut"
        for a, b in list(conns):
            for w in (a, b):
                try:
                    w.transport.abort()
                except Exception:
                    pass
        conns.clear()
    elif cmd == "blackhole":
        state["mode"] = "blackhole"
    elif cmd == "heal":
        state["mode"] = "up"
    elif cmd == "delay":
        state["delay"] = int(line[1]) / 1000.0
    log("control", cmd, state)
    writer.write(f"ok {state['mode']} {state['delay']}\n".encode())
    await writer.drain()
    writer.close()


async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    c = await asyncio.start_server(control, "127.0.0.1", CONTROL)
    log(f"proxy {LISTEN} -> {TARGET}, control {CONTROL}, delay {state['delay']}")
    async with s, c:
        await asyncio.gather(s.serve_forever(), c.serve_forever())


asyncio.run(main())
