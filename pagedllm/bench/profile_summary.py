"""Summarise a py-spy raw profile (collapsed stacks): the functions with the most samples, by self
time and by inclusive time.   python3 -m pagedllm.bench.profile_summary PROFILE.txt [TOP]"""

import sys
from collections import Counter


def summarise(path: str, top: int = 30) -> str:
    own, inclusive, total = Counter(), Counter(), 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{path}: {total} samples", "self:"]
    lines += [f"  {n / total:6.1%}  {frame[:140]}" for frame, n in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {n / total:6.1%}  {frame[:140]}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30))
