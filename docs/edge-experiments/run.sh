#!/bin/bash
# start|stop NAME ; pids in /tmp/edge-research/pids
D=/tmp/edge-research; B=/root/.cache/mayfly-nats/venv/bin/nats-server; mkdir -p $D/pids $D/logs
case $1 in
 start) shift; for n in "$@"; do
   case $n in
    hub|site-a|site-b) $B -c $D/conf/$n.conf > $D/logs/$n.log 2>&1 & echo $! > $D/pids/$n;;
    proxy-a) python3 $D/proxy.py 27501 27422 27601 ${DELAY:-0} > $D/logs/$n.log 2>&1 & echo $! > $D/pids/$n;;
    proxy-b) python3 $D/proxy.py 27502 27422 27602 ${DELAY:-0} > $D/logs/$n.log 2>&1 & echo $! > $D/pids/$n;;
   esac; done;;
 stop) shift; for n in "$@"; do [ -f $D/pids/$n ] && kill $(cat $D/pids/$n) 2>/dev/null; rm -f $D/pids/$n; done;;
 kill9) shift; for n in "$@"; do [ -f $D/pids/$n ] && kill -9 $(cat $D/pids/$n) 2>/dev/null; rm -f $D/pids/$n; done;;
esac
