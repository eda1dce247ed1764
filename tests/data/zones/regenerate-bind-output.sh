#!/bin/sh
# Re-create bind/*.out (accepted zones: named-compilezone's canonical output)
# and bind/*.rejected (BIND's messages) for every corpus file.  Needs
# bind9-utils.  "-i local": in-zone integrity checks only, so no name lookups
# leave the machine.  The test suite compares against these snapshots, and against
# a live named-compilezone when one is installed.
set -e
cd "$(dirname "$0")"
mkdir -p bind
rm -f bind/*.out bind/*.rejected
for f in *.zone; do
    origin=$(sed -n 's/^; origin: //p' "$f" | head -1)
    base=${f%.zone}
    if named-compilezone -i local -f text -F text -s full -w "$PWD" -o "bind/$base.out" \
        "$origin" "$f" > "bind/$base.log" 2>&1; then
        rm -f "bind/$base.log"
    else
        rm -f "bind/$base.out"
        mv "bind/$base.log" "bind/$base.rejected"
    fi
done
