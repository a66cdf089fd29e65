#!/bin/sh
# A worker without a port: it takes jobs from somewhere (here, it ticks)
# and stops between two jobs on SIGTERM.
trap 'echo "worker $$: stopping"; exit 0' TERM
echo "worker $$: started"
while :; do
    sleep 1 &
    wait $!
done
