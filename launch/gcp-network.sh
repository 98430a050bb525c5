#!/usr/bin/env bash
# Create the VPC network that launch/gcp-t4.yaml puts every node in: one subnet, all traffic inside it, SSH (22)
# from one admin network, nothing else. Ray's dashboard and job API (8265), GCS (6379) and client server (10001)
# stay closed to the internet; reach them through `ray dashboard` / `ray attach` (SSH).
#
#   ADMIN_CIDR=203.0.113.7/32 REGION=us-west1 launch/gcp-network.sh
#
# Uses the project of your gcloud configuration. NETWORK (default geopose-ray) and SUBNET_RANGE
# (default 10.42.0.0/20) must match the subnetwork in launch/gcp-t4.yaml.
#
# Why a network of its own: the project's `default` network usually carries default-allow-ssh, which opens 22
# to 0.0.0.0/0 for every instance in it.
set -euo pipefail

NETWORK="${NETWORK:-geopose-ray}"
REGION="${REGION:-us-west1}"
SUBNET_RANGE="${SUBNET_RANGE:-10.42.0.0/20}"
ADMIN_CIDR="${ADMIN_CIDR:-}"

die() {
	echo "gcp-network.sh: $*" >&2
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

gcloud compute networks create "$NETWORK" --subnet-mode=custom
gcloud compute networks subnets create "$NETWORK" --network="$NETWORK" --region="$REGION" --range="$SUBNET_RANGE"
# Every port between the cluster's nodes: Ray's GCS, raylets, object managers and workers talk to each other.
gcloud compute firewall-rules create "$NETWORK-internal" --network="$NETWORK" --direction=INGRESS \
	--allow=tcp,udp,icmp --source-ranges="$SUBNET_RANGE"
gcloud compute firewall-rules create "$NETWORK-admin-ssh" --network="$NETWORK" --direction=INGRESS \
	--allow=tcp:22 --source-ranges="$ADMIN_CIDR"
echo "network $NETWORK, subnetwork regions/$REGION/subnetworks/$NETWORK ($SUBNET_RANGE), SSH from $ADMIN_CIDR"
