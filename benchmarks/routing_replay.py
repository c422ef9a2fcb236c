"""What each engine core computes for `bench data-parallel`'s tenants workload under each routing
policy and KV pool size, without a GPU: the requests are routed as a burst by the real Router (one per
API process, --api-servers, dealt the requests in turn as the kernel spreads connections), then
each core's share runs through a real EngineCore (scheduler, KV cache manager, prefix caching) whose
executor finishes every step at once (tests/engine_fakes.InstantExecutor). Prints each core's steps,
computed prompt tokens (cached ones excluded) and preemptions. Hardware-independent: it says where
routing changes the work, not how long the work takes. A development tool:
`python benchmarks/routing_replay.py --pool-blocks 71754 4000 3500` (blocks of 16 tokens a core)."""

import argparse
import os
import sys
import time

from pagedllm.bench.data_parallel import add_tenant_args, tenant_requests
from pagedllm.core_types import EngineCoreRequest
from pagedllm.engine.core import EngineCore
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.router import Router
from pagedllm.sampling_params import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from engine_fakes import InstantExecutor  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "pagedllm", "data", "qwen3-0.6b-config.json")


def replay(args, config, requests, policy: str, pool_blocks: int) -> list[tuple[int, int, int, int]]:
    """(requests, steps, computed prompt tokens, preemptions) of each core."""
    capacity = None if args.no_capacity else config.scheduler.max_num_seqs
    routers = [Router(args.cores, config.cache.block_size, policy, routers=args.api_servers, capacity=capacity)
               for _ in range(args.api_servers)]
    shares = [[] for _ in range(args.cores)]
    for i, r in enumerate(requests):
        core = routers[i % args.api_servers].route([str(i)], r.prompt_token_ids)
        shares[core].append((str(i), r.prompt_token_ids))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    result = []
    for share in shares:
        core = EngineCore(config, InstantExecutor(num_blocks=pool_blocks))
        core.add_requests([EngineCoreRequest(rid, ids, params, time.monotonic()) for rid, ids in share])
        steps = 0
        while core.has_work():
            core.step()
            steps += 1
        result.append((len(share), steps, core.prompt_tokens, core.scheduler.num_preemptions))
        core.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--api-servers", type=int, default=1, help="routers, each routing its share on its own")
    parser.add_argument("--no-capacity", action="store_true", help="routers that do not know max_num_seqs")
    add_tenant_args(parser)
    parser.add_argument("--pool-blocks", type=int, nargs="+", default=[71754, 4000, 3500],
                        help="KV blocks of 16 tokens a core (71,754: Qwen3-0.6B on an H200 at 0.9 utilisation)")
    args = parser.parse_args()
    config = EngineArgs(model=CONFIG, load_format="dummy", max_model_len=4096, device="cpu",
                        max_num_batched_tokens=8192, max_num_seqs=256).create_config()[0]
    requests = tenant_requests(args, config.model.hf_config.vocab_size)     # as bench data-parallel sends them
    print("pool blocks  routing      per core: (requests, steps, computed prompt tokens, preemptions)")
    for blocks in args.pool_blocks:
        for policy in ("prefix", "round-robin"):
            print(f"{blocks:11d}  {policy:12s} {replay(args, config, requests, policy, blocks)}", flush=True)


if __name__ == "__main__":
    main()
