#!/usr/bin/env bash
# Create the security group that launch/aws-t4.yaml puts every node in: all traffic between the cluster's own
# nodes, SSH (22) from one admin network, nothing else. Ray's dashboard and job API (8265), GCS (6379) and
# client server (10001) stay closed to the internet; reach them through `ray dashboard` / `ray attach` (SSH).
#
#   ADMIN_CIDR=203.0.113.7/32 launch/aws-security-group.sh     # your address: curl -s https://checkip.amazonaws.com
#
# Prints the group id to put in SecurityGroupIds in launch/aws-t4.yaml. Uses the default VPC unless VPC_ID is
# set, the region from AWS_REGION / your AWS CLI profile, GROUP_NAME (default geopose-ray).
#
# Why not let `ray up` create the group: the group Ray creates always allows SSH from 0.0.0.0/0.
set -euo pipefail

GROUP_NAME="${GROUP_NAME:-geopose-ray}"
ADMIN_CIDR="${ADMIN_CIDR:-}"

die() {
	echo "aws-security-group.sh: $*" >&2
	exit 2
}

if [[ -z "$ADMIN_CIDR" ]]; then
	die "set ADMIN_CIDR to the network you SSH from, e.g. ADMIN_CIDR=\$(curl -s https://checkip.amazonaws.com)/32"
fi
if [[ ! "$ADMIN_CIDR" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
	die "ADMIN_CIDR '$ADMIN_CIDR' is not an IPv4 CIDR such as 203.0.113.7/32"
fi
if [[ "${ADMIN_CIDR#*/}" -lt 8 ]]; then
	die "ADMIN_CIDR '$ADMIN_CIDR' opens SSH to a /${ADMIN_CIDR#*/}: give your own network (a /32 or a small range)"
fi

vpc="${VPC_ID:-}"
if [[ -z "$vpc" ]]; then
	vpc="$(aws ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)"
	if [[ -z "$vpc" || "$vpc" == None ]]; then
		die "no default VPC in this region: set VPC_ID"
	fi
fi

sg="$(aws ec2 create-security-group --group-name "$GROUP_NAME" --vpc-id "$vpc" \
	--description "geopose-ray: cluster-internal traffic and SSH from the admin network only" \
	--query GroupId --output text)"
# Every port between members of the group: Ray's GCS, raylets, object managers and workers talk to each other.
aws ec2 authorize-security-group-ingress --group-id "$sg" \
	--ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg}]" >/dev/null
aws ec2 authorize-security-group-ingress --group-id "$sg" \
	--ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ADMIN_CIDR,Description=admin-ssh}]" >/dev/null
echo "$sg"
