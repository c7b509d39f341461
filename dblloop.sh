#!/bin/bash
cd /tmp/hunt_conc
for r in $(seq 20 27); do rm -rf mx/d$r; mkdir -p mx/d$r; ( for k in $(seq 1 60); do touch pp/r${r}_$k.py; sleep 0.15; done ) & GRAPHDRIVER_SOCKET=/tmp/hunt_conc/srv2.sock ./dbl.sh /tmp/hunt_conc/mx/d$r 300; wait; rm -rf mx/d$r; done; echo DONE
