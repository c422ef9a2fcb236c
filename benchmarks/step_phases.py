"""Where a step's host time goes: wall ms per step in each engine phase and in the model runner's calls
(structured_profile.py's wrappers), for --batch requests of 512 prompt tokens and 256 new ones each
(the prompts' steps included), with the fused sampler (temperature 0.6) and with argmax (temperature
0). A development tool for a GPU:
`python benchmarks/step_phases.py --tokenizer DIR [--batch N] [MODEL]` (default Qwen/Qwen3-0.6B, dummy
weights, batch 1)."""

import argparse

import structured_profile as sp

from pagedllm import LLM, SamplingParams
from pagedllm.engine.core import EngineCore
from pagedllm.engine.scheduler import Scheduler
from pagedllm.worker import cuda_graphs, model_runner, sampler
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.model_runner import ModelRunner, PendingStep

CALLS = {
    "engine step (all)": (EngineCore, "step"),
    "schedule": (Scheduler, "schedule"),
    "execute_model (prepare + issue)": (ModelRunner, "execute_model"),
    "  apply the scheduler's diff": (InputBatch, "apply"),
    "  _prepare (inputs as arrays)": (ModelRunner, "_prepare"),
    "  _execute (forward + logits)": (ModelRunner, "_execute"),
    "    CudaGraphs.run (copies + replay)": (cuda_graphs.CudaGraphs, "run"),
    "  _sample (issue sampling)": (ModelRunner, "_sample"),
    "    _fused_sample": (sampler, "_fused_sample"),
    "result (wait for the device)": (PendingStep, "result"),
    "update_from_output": (Scheduler, "update_from_output"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch", type=int, default=1, help="requests at once")
    args = parser.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, tokenizer=args.tokenizer)
    sp.TIMED = CALLS
    for name, (owner, attr) in CALLS.items():
        setattr(owner, attr, sp.timed(name, getattr(owner, attr)))
    timed_to_device = sp.timed("to_device (every host-to-device copy)", model_runner.to_device)
    for module in (model_runner, sampler, cuda_graphs):
        module.to_device = timed_to_device
    sp.TIMED = {**CALLS, "to_device (every host-to-device copy)": None}
    prompts = [{"prompt_token_ids": list(range(1000 + i, 1512 + i))} for i in range(args.batch)]
    for temperature in (0.6, 0.0):
        params = SamplingParams(temperature=temperature, max_tokens=256, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
        for repeat in range(2):
            sp.run(llm, f"batch {args.batch}, temperature {temperature}, repeat {repeat + 1}", prompts, params)


if __name__ == "__main__":
    main()
