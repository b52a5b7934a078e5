#!/usr/bin/env bash
# The comm figures of docs/benchmarks.md: every row is measured against torch.distributed (gloo) in the
# same run, impls taking turns (5 blocks each, median block, a fresh order every round, an untimed
# call before every block), so the ratios survive a shared machine. Registered runs give every impl its own shared-memory buffer.
set -euo pipefail
out=${1:-benchmarks}
uptime
for w in 2 4; do
  aiinfra bench comm --op all_reduce --world-size "$w" --sizes 8,4K,1M,16M,64M \
    --impl torch,auto,one_shot,two_shot,cma_two_shot,ring@torch \
    --json "$out/comm_all_reduce_w$w.json" --plot "$out/comm_all_reduce_w$w.png"
  aiinfra bench comm --op all_reduce --world-size "$w" --sizes 1M,16M,64M \
    --impl torch,auto,two_shot,push_two_shot --registered \
    --json "$out/comm_all_reduce_registered_w$w.json"
done
aiinfra bench comm --op all_gather --world-size 4 --sizes 8,1M,64M --impl torch,auto,ring@torch \
  --json "$out/comm_all_gather_w4.json"
uptime
