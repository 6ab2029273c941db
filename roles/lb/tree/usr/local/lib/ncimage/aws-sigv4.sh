# ncimage lb role: AWS Signature Version 4 in POSIX sh with openssl (sourced by
# ncimage-floating-ip for EC2 AssociateAddress). No SDK in the image: these few lines are all
# the floating IP needs.
#
# sigv4_authorization METHOD HOST PATH QUERY PAYLOAD REGION SERVICE AMZDATE ACCESS_KEY SECRET_KEY
#   [SESSION_TOKEN]  prints the Authorization header value for a request whose signed headers
#   are content-type (application/x-www-form-urlencoded; charset=utf-8), host and x-amz-date
#   (plus x-amz-security-token when a session token is given).

_sha256_hex() { printf '%s' "$1" | openssl dgst -sha256 | sed 's/^.* //'; }
_hmac_hex() { printf '%s' "$2" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$1" | sed 's/^.* //'; }
_hex() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'; }

sigv4_authorization() {
    method=$1 host=$2 path=$3 query=$4 payload=$5 region=$6 service=$7 amzdate=$8 akid=$9
    shift 9
    secret=$1 token=${2:-}
    day=${amzdate%%T*}
    ctype='application/x-www-form-urlencoded; charset=utf-8'
    nl='
'
    headers="content-type:$ctype${nl}host:$host${nl}x-amz-date:$amzdate$nl"
    signed='content-type;host;x-amz-date'
    if [ -n "$token" ]; then
        headers="${headers}x-amz-security-token:$token$nl"
        signed="$signed;x-amz-security-token"
    fi
    canonical="$method$nl$path$nl$query$nl$headers$nl$signed$nl$(_sha256_hex "$payload")"
    scope="$day/$region/$service/aws4_request"
    to_sign="AWS4-HMAC-SHA256$nl$amzdate$nl$scope$nl$(_sha256_hex "$canonical")"
    k=$(_hmac_hex "$(_hex "AWS4$secret")" "$day")
    k=$(_hmac_hex "$k" "$region")
    k=$(_hmac_hex "$k" "$service")
    k=$(_hmac_hex "$k" aws4_request)
    sig=$(_hmac_hex "$k" "$to_sign")
    printf 'AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s\n' "$akid" "$scope" "$signed" "$sig"
}
