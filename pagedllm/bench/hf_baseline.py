"""`--baseline hf`: the same requests through Hugging Face transformers, on the SAME weights.

The HF model is built with AutoModelForCausalLM.from_config(engine's hf_config) in the engine's dtype
on the engine's device, and our model's tensors are copied in (the fused qkv_proj / gate_up_proj are
split back into q/k/v and gate/up by their shard_sizes). So both engines run identical weights,
whether they came from a checkpoint or from load_format="dummy".

Two HF modes:
- `generate`: padded batches of `batch_size` requests in workload order, left padding,
  max_new_tokens = min_new_tokens = the batch's longest requested output (so EOS cannot end it
  early); only each request's own requested output tokens count as useful.
- continuous batching (`generate_batch` / its manager, if the installed version has it and it runs):
  every request with its own max_new_tokens; failures are caught and their text recorded.
"""

import gc
import time
import traceback

import torch

from pagedllm.bench.workloads import BenchRequest


def build_hf_model(llm):
    """An HF causal LM with our engine's weights, dtype and device."""
    from transformers import AutoModelForCausalLM
    runner = llm.llm_engine.model_runner
    ours = runner.model
    hf_config = llm.llm_engine.config.model.hf_config
    dtype, device = runner.dtype, runner.device
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    finally:
        torch.set_default_dtype(old)
    hf.to(device=device, dtype=dtype).eval()
    copy_weights(ours, hf)
    return hf


def copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> int:
    """Copy every HF parameter from our model; returns how many tensors were written."""
    src = dict(ours.named_parameters())
    written = 0
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name == "lm_head.weight" and name not in src:
                # tied: the HF lm_head shares the embedding (checked below), else copy it
                if param.data_ptr() == hf.get_input_embeddings().weight.data_ptr():
                    continue
                param.copy_(src["model.embed_tokens.weight"])
                written += 1
                continue
            tensor = _source_tensor(ours, src, name)
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: ours {tuple(tensor.shape)} vs HF {tuple(param.shape)}")
            param.copy_(tensor)
            written += 1
    return written


_SPLITS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _source_tensor(ours, src: dict, name: str) -> torch.Tensor:
    if name in src:
        return src[name]
    for part, (fused, index) in _SPLITS.items():
        if f".{part}." in name:
            fused_name = name.replace(f".{part}.", f".{fused}.")
            module = ours.get_submodule(fused_name.rsplit(".", 2)[0])
            sizes = module.shard_sizes
            start = sum(sizes[:index])
            return src[fused_name][start:start + sizes[index]]
    raise ValueError(f"HF parameter {name!r} has no counterpart in our model")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _gen_kwargs(temperature: float) -> dict:
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    return dict(do_sample=False, temperature=None, top_k=None, top_p=None)


def run_hf_generate(hf, requests: list[BenchRequest], temperature: float, batch_size: int,
                    pad_token_id: int = 0) -> dict:
    """Padded-batch `generate`, left padding; useful tokens = each request's requested output."""
    device = next(hf.parameters()).device
    useful = generated = padded_prompt = 0
    batches = []
    _sync(device)
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        new = max(r.output_len for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_token_ids)
            mask[i, width - n:] = 1
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=pad_token_id, **_gen_kwargs(temperature))
        _sync(device)
        n_out = out.shape[1] - width
        generated += n_out * len(batch)
        useful += sum(min(r.output_len, n_out) for r in batch)
        padded_prompt += width * len(batch)
        batches.append({"size": len(batch), "prompt_width": width, "max_new_tokens": new,
                        "elapsed_s": time.perf_counter() - t0})
        del out
    elapsed = time.perf_counter() - start
    return {"name": "hf generate (padded batches)", "batch_size": batch_size, "num_requests": len(requests),
            "elapsed_s": elapsed, "output_tokens": useful, "generated_tokens_incl_padding": generated,
            "padded_prompt_tokens": padded_prompt, "output_tokens_per_s": useful / elapsed,
            "requests_per_s": len(requests) / elapsed, "batches": batches}


def run_hf_continuous(hf, requests: list[BenchRequest], temperature: float, timeout_s: float = 1800) -> dict:
    """transformers' continuous batching (each request its own max_new_tokens). Raises on failure."""
    from transformers import GenerationConfig
    device = next(hf.parameters()).device
    cfg = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), eos_token_id=None,
                           pad_token_id=0, **{k: v for k, v in _gen_kwargs(temperature).items() if v is not None})
    inputs = [r.prompt_token_ids for r in requests]
    _sync(device)
    setup = time.perf_counter()
    api = "init_continuous_batching"
    try:
        kwargs = {}
        try:  # size the paged cache for this workload where the version supports hints
            from transformers.generation.continuous_batching.utils import WorkloadHints
            kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(len(i) for i in inputs), max_generated_length=cfg.max_new_tokens,
                num_requests=len(inputs))
        except (ImportError, TypeError):
            pass
        try:
            manager = hf.init_continuous_batching(generation_config=cfg, **kwargs)
        except TypeError:
            manager = hf.init_continuous_batching(generation_config=cfg)
        manager.start()
        _sync(device)
        start = time.perf_counter()   # the clock starts at the first request (setup_s is separate)
        try:
            ids = [manager.add_request(inp, request_id=f"r{i}", max_new_tokens=r.output_len)
                   for i, (inp, r) in enumerate(zip(inputs, requests))]
            results = {}
            deadline = time.monotonic() + timeout_s
            while len(results) < len(ids):
                res = manager.get_result(timeout=1.0)
                if res is not None and res.is_finished():
                    if res.error:
                        raise RuntimeError(f"request {res.request_id}: {res.error}")
                    results[res.request_id] = res
                if time.monotonic() > deadline:
                    raise TimeoutError(f"continuous batching: {len(results)}/{len(ids)} done in {timeout_s}s")
                if not manager.is_running() and len(results) < len(ids):
                    raise RuntimeError("continuous batching manager stopped early")
        finally:
            manager.stop(block=True, timeout=10)
        outs = [results[f"r{i}"].generated_tokens for i in range(len(requests))]
    except TypeError:
        # older API without per-request max_new_tokens: generate_batch with one global limit
        api = "generate_batch"
        start = time.perf_counter()
        res = hf.generate_batch(inputs, generation_config=cfg, progress_bar=False)
        outs = [o.generated_tokens for o in sorted(res.values(), key=lambda o: _rid(o.request_id))]
    _sync(device)
    elapsed = time.perf_counter() - start
    useful = sum(min(len(o), r.output_len) for o, r in zip(outs, requests))
    return {"name": f"hf continuous batching ({api})", "num_requests": len(requests), "elapsed_s": elapsed,
            "setup_s": start - setup,
            "output_tokens": useful, "generated_tokens": sum(len(o) for o in outs),
            "requests_short": sum(len(o) < r.output_len for o, r in zip(outs, requests)),
            "output_tokens_per_s": useful / elapsed, "requests_per_s": len(requests) / elapsed}


def _rid(request_id: str):
    digits = "".join(c for c in str(request_id) if c.isdigit())
    return int(digits) if digits else request_id


def run_hf_baseline(hf, requests: list[BenchRequest], temperature: float, batch_size: int,
                    continuous: bool = True, timeout_s: float = 1800) -> dict:
    """Both HF modes; a failing mode is recorded with its error text instead of a figure."""
    out = {"weights": "copied from the pagedllm engine's model (fused qkv/gate_up split back)",
           "model_class": type(hf).__name__}
    try:
        out["generate"] = run_hf_generate(hf, requests, temperature, batch_size)
    except Exception as exc:  # noqa: BLE001 - a baseline failure must not lose the main result
        out["generate"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
        _free()
    if continuous:
        try:
            out["continuous_batching"] = run_hf_continuous(hf, requests, temperature, timeout_s)
        except Exception as exc:  # noqa: BLE001
            out["continuous_batching"] = {"error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc(limit=5)}
            _free()
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
