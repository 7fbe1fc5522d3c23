#!/usr/bin/env bash
# radosgw (Ceph 16.2.15) conditional PUT probe with curl SigV4. Usage: probe_s3.sh [BUCKET]
set -u
EP=http://127.0.0.1:${RGW_PORT:-7480}
B=${1:-segs}
CRED=CIACCESSKEY0000000000:cisecretkey00000000000000000000000000000
TMP=$(mktemp -d)
# s3 PUT KEY DATA [extra header...] -> prints "HTTP <status> etag=<etag>"
s3put() {
  local key=$1 data=$2; shift 2
  printf '%s' "$data" > "$TMP/body"
  local sha; sha=$(sha256sum "$TMP/body" | cut -d' ' -f1)
  local hdrs=()
  for h in "$@"; do hdrs+=(-H "$h"); done
  curl -sS -o "$TMP/resp" -D "$TMP/hdr" -w '%{http_code}' -X PUT --data-binary @"$TMP/body" \
    -H "x-amz-content-sha256: $sha" "${hdrs[@]}" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$CRED" "$EP/$B/$key" > "$TMP/code"
  local et; et=$(grep -i '^etag:' "$TMP/hdr" | tr -d '\r' | cut -d' ' -f2)
  echo "HTTP $(cat "$TMP/code") etag=${et:-none} $(grep -o '<Code>[^<]*</Code>' "$TMP/resp")"
}
s3get() {
  curl -sS -D "$TMP/ghdr" -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)" \
    --aws-sigv4 "aws:amz:us-east-1:s3" --user "$CRED" "$EP/$B/$1"; echo " (etag $(grep -i '^etag:' "$TMP/ghdr" | tr -d '\r' | cut -d' ' -f2))"
}
curl -sS -D - -o /dev/null "$EP/" | grep -i '^server\|^HTTP'
K=lease-$RANDOM
echo "1. PUT $K If-None-Match: *  (absent)         -> $(s3put $K v1 'If-None-Match: *')"
echo "2. PUT $K If-None-Match: *  (exists)         -> $(s3put $K v2 'If-None-Match: *')"
echo "   GET -> $(s3get $K)"
E1=$(grep -i '^etag:' "$TMP/ghdr" | tr -d '\r' | cut -d' ' -f2)
echo "3. PUT $K If-Match: $E1 (current)  -> $(s3put $K v3 "If-Match: $E1")"
echo "   GET -> $(s3get $K)"
echo "4. PUT $K If-Match: $E1 (stale)    -> $(s3put $K v4-stale "If-Match: $E1")"
echo "   GET -> $(s3get $K)"
echo "5. PUT $K If-Match: \"0000\" (bogus)  -> $(s3put $K v5 'If-Match: "00000000000000000000000000000000"')"
echo "6. PUT missing-$K If-Match: $E1 -> $(s3put missing-$K v6 "If-Match: $E1")"
echo "7. PUT $K with no condition (stale writer) -> $(s3put $K v7-unconditional)"
echo "   GET -> $(s3get $K)"
U1=$(s3get $K >/dev/null; grep -i '^etag:' "$TMP/ghdr" | tr -d '\r"' | cut -d' ' -f2)
echo "7b. PUT $K If-Match: $U1 (current, UNQUOTED) -> $(s3put $K v7b "If-Match: $U1")"
echo "   GET -> $(s3get $K)"
echo "7c. PUT $K If-Match: $U1 (stale, UNQUOTED)   -> $(s3put $K v7c-stale "If-Match: $U1")"
echo "   GET -> $(s3get $K)"
echo "7d. PUT $K If-Match: *  (exists)             -> $(s3put $K v7d 'If-Match: *')"
echo "7e. PUT missing2-$K If-Match: *  (absent)    -> $(s3put missing2-$K v7e 'If-Match: *')"
echo "8. PUT $K If-None-Match: <other etag> -> $(s3put $K v8 'If-None-Match: "00000000000000000000000000000000"')"
# 9. race: N keys, two concurrent PUT If-None-Match: * each; count 200s per key
N=${RACE_KEYS:-30}; dup=0
for i in $(seq $N); do
  k=race-$RANDOM-$i
  ( cd "$TMP"; mkdir -p a$i b$i; TMP=$TMP/a$i s3put $k nodeA 'If-None-Match: *' > $TMP/ra$i ) &
  ( cd "$TMP"; mkdir -p a$i b$i; TMP=$TMP/b$i s3put $k nodeB 'If-None-Match: *' > $TMP/rb$i ) &
  wait
  c=$(cat $TMP/ra$i $TMP/rb$i | grep -c '^HTTP 200')
  [ "$c" -gt 1 ] && dup=$((dup+1))
  echo "$k A:$(cut -c1-8 $TMP/ra$i) B:$(cut -c1-8 $TMP/rb$i) final=$(s3get $k | cut -d' ' -f1)" >> $TMP/race.log
done
echo "9. race: $N keys x 2 concurrent PUT If-None-Match:* -> keys where BOTH got 200: $dup"
awk '{print $2,$3,$4,$5}' $TMP/race.log | sort | uniq -c
rm -rf "$TMP"
