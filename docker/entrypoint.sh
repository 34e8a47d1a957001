#!/bin/sh
# PID 1 of the container: runs optsearch, hands it SIGINT/SIGTERM (docker stop), and ends a usage
# error (exit 2: bad spec, option or study name) for good instead of being restarted in a loop:
# it is reported and turned into exit 0.
optsearch "$@" &
child=$!
trap 'kill -INT "$child" 2>/dev/null' INT TERM
wait "$child"
code=$?
while kill -0 "$child" 2>/dev/null; do  # `wait` returned for the signal: wait for the exit
    wait "$child"
    code=$?
done
if [ "$code" -eq 2 ]; then
    echo "optsearch: usage error (exit 2) above: not restarting; fix the spec or the options" >&2
    exit 0
fi
exit "$code"
