#!/usr/bin/env python3
"""Greedy cleaning under uniform random overwrites: bytes moved per byte written.

A log of SEGMENTS segments of BLOCKS blocks holds U x SEGMENTS x BLOCKS live blocks, written
sequentially, then overwritten at random (each overwrite kills the block's old copy and appends
the new one). When free segments fall to FREE, the cleaner empties the segment with the fewest
live blocks (greedy) and appends its live blocks to the log. Prints the moved blocks per client
block over the second half of the run: the figure `bench/scripts/gc.sh` reports as moved/w
(ingot's WA adds 1 for the client's own bytes, plus record headers and checkpoints).

Usage: bench/scripts/gc-model.py [U ...] [--segments N] [--blocks B] [--free F] [--rounds R]
"""
import argparse
import heapq
import random


def moved_per_write(u, segments, blocks, free_target, rounds, seed=1):
    rng = random.Random(seed)
    n_live = int(u * segments * blocks)
    seg_of = [0] * n_live
    live = [0] * segments
    members = [[] for _ in range(segments)]
    free = list(range(segments))
    state = {"cur": free.pop(0), "fill": 0}

    def append(b):
        if state["fill"] == blocks:
            state["cur"] = free.pop(0)
            state["fill"] = 0
        s = state["cur"]
        seg_of[b] = s
        live[s] += 1
        members[s].append(b)
        state["fill"] += 1

    for b in range(n_live):
        append(b)
    moved = 0

    def clean():
        nonlocal moved
        free_set = set(free)
        while len(free) < free_target:
            cands = [(live[s], s) for s in range(segments) if s != state["cur"] and s not in free_set]
            _, victim = heapq.nsmallest(1, cands)[0]
            keep = [b for b in members[victim] if seg_of[b] == victim]
            members[victim] = []
            live[victim] = 0
            free.append(victim)
            free_set.add(victim)
            for b in keep:
                append(b)
                moved += 1

    total = rounds * n_live
    half_moved = 0
    for i in range(total):
        if i == total // 2:
            half_moved = moved
        b = rng.randrange(n_live)
        live[seg_of[b]] -= 1
        seg_of[b] = -1
        if state["fill"] == blocks and len(free) <= free_target:
            clean()
        append(b)
    return (moved - half_moved) / (total - total // 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("u", nargs="*", type=float, default=[0.5, 0.7, 0.75, 0.8, 0.81, 0.85])
    p.add_argument("--segments", type=int, default=128)
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--free", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    print(f"{'live share':>10} {'moved/w':>8} {'1/(1-u)':>8}")
    for u in a.u:
        m = moved_per_write(u, a.segments, a.blocks, a.free, a.rounds)
        print(f"{u:>10.2f} {m:>8.2f} {1 / (1 - u):>8.2f}")


if __name__ == "__main__":
    main()
