#!/usr/bin/env bash
# Race W concurrent conditional PUTs per key against radosgw; count keys where >1 got 200.
set -u
EP=http://127.0.0.1:${RGW_PORT:-7480}; B=${1:-segs}; W=${W:-8}; N=${N:-30}
CRED=CIACCESSKEY0000000000:cisecretkey00000000000000000000000000000
T=$(mktemp -d)
put() { # key body header -> prints status
  local sha; sha=$(printf '%s' "$2" | sha256sum | cut -d' ' -f1)
  curl -sS -o /dev/null -w '%{http_code}\n' -X PUT --data-binary "$2" -H "x-amz-content-sha256: $sha" -H "$3" \
    --aws-sigv4 "aws:amz:us-east-1:s3" --user "$CRED" "$EP/$B/$1"
}
get() { curl -sS -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$CRED" "$EP/$B/$1"; }
for mode in create cas; do
  multi=0; lost=0
  for i in $(seq $N); do
    k=$mode-$RANDOM-$i
    if [ $mode = cas ]; then put $k base 'x-probe: 1' >/dev/null; hdr="If-Match: $(printf base | md5sum | cut -d' ' -f1)"; else hdr='If-None-Match: *'; fi
    for w in $(seq $W); do put $k "w$w" "$hdr" > $T/$i.$w & done; wait
    ok=$(cat $T/$i.* | grep -c '^200'); final=$(get $k)
    winners=$(for w in $(seq $W); do grep -q '^200' $T/$i.$w && echo w$w; done | tr '\n' ' ')
    [ "$ok" -gt 1 ] && multi=$((multi+1))
    # a 200 whose body is not the final content = an acknowledged write that was lost
    for wn in $winners; do [ "$wn" != "$final" ] && lost=$((lost+1)); done
    echo "$mode $k statuses=$(sort $T/$i.* | uniq -c | tr -s ' \n' ' ') final=$final" >> $T/log
  done
  echo "$mode ($hdr): $N keys x $W concurrent PUTs -> keys with >1 HTTP 200: $multi; acknowledged-but-lost writes: $lost"
  echo "   all statuses: $(cat $T/*.* | sort | uniq -c | tr -s ' \n' ' ')"; grep "^$mode" $T/log | head -3; rm -f $T/*.*
done
rm -rf $T
