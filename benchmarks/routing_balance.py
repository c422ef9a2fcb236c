"""How evenly prefix routing spreads work when several API processes route a burst, each on its own
(requests dealt to their routers in turn, no core report in between): for nano (prompts sharing
nothing, each one new), the slower core's prompt + output tokens over the mean; for the tenants
workload, how many system prompts end up on more than one core. Rows: one router; two routers that
do not know of each other (each new prompt to its own least-loaded core); two shared routers (the
rendezvous order within router.HOME_SLACK), and the same with no slack (hashes alone).
CPU only: `python benchmarks/routing_balance.py [--seeds 20]`."""

import argparse
import statistics

from pagedllm.bench.data_parallel import add_tenant_args, tenant_requests
from pagedllm.bench.workloads import BenchRequest, nano_requests
from pagedllm.engine import router as router_module
from pagedllm.engine.router import Router

VOCAB = 151936
BLOCK = 16
SETUPS = {"one router": (1, False, None), "two routers, apart": (2, False, None),
          "two routers, shared": (2, True, None), "two shared, no slack": (2, True, 10 ** 9)}


def route_burst(requests: list[BenchRequest], routers: int, shared: bool, slack: int | None) -> list[int]:
    """Each request's core."""
    default = router_module.HOME_SLACK
    router_module.HOME_SLACK = default if slack is None else slack
    try:
        pool = [Router(2, BLOCK, "prefix", routers=routers if shared else 1) for _ in range(routers)]
        return [pool[i % routers].route([str(i)], r.prompt_token_ids) for i, r in enumerate(requests)]
    finally:
        router_module.HOME_SLACK = default


def nano_imbalance(seeds: int, setup: tuple) -> list[float]:
    out = []
    for seed in range(seeds):
        requests = nano_requests(VOCAB, seed=seed)
        tokens = [0, 0]
        for r, core in zip(requests, route_burst(requests, *setup)):
            tokens[core] += len(r.prompt_token_ids) + r.output_len
        out.append(max(tokens) / (sum(tokens) / 2))
    return out


def split_prompts(args, setup: tuple) -> int:
    requests = tenant_requests(args, VOCAB)
    cores: dict[tuple, set[int]] = {}
    for r, core in zip(requests, route_burst(requests, *setup)):
        cores.setdefault(tuple(r.prompt_token_ids[:args.prefix_len]), set()).add(core)
    return sum(len(c) > 1 for c in cores.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    add_tenant_args(parser)
    args = parser.parse_args()
    print(f"two cores; nano over {args.seeds} seeds: slower core's tokens / mean (average, worst); "
          f"tenants ({args.num_tenants} x {args.per_tenant}): system prompts on both cores")
    for name, setup in SETUPS.items():
        ratios = nano_imbalance(args.seeds, setup)
        print(f"  {name:22s} nano {statistics.mean(ratios):.4f} {max(ratios):.4f}   tenants split "
              f"{split_prompts(args, setup)}", flush=True)


if __name__ == "__main__":
    main()
